"""The model zoo and torch.hub: docs/model_zoo.md and .json are what study/model_zoo.py makes from
the records and the files, every released checkpoint is listed with its size and sha256, and every
hubconf.py entry point is listed, documented, and loads what eval.py loads."""
import glob
import hashlib
import importlib.util
import json
import os

import pytest
import torch

import data
import models
from core import evaluation
from study import model_zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "docs", "model_zoo.json")) as f:
    ZOO = json.load(f)


def load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_zoo_page_and_json_are_what_the_script_makes_from_the_records_and_files():
    text, rows = model_zoo.build()
    with open(os.path.join(ROOT, "docs", "model_zoo.md")) as f:
        assert text == f.read(), "docs/model_zoo.md is stale: run python study/model_zoo.py"
    assert json.loads(json.dumps(rows)) == ZOO, "docs/model_zoo.json is stale: run python study/model_zoo.py"


def test_start_here_shows_the_median_seed_and_its_static_counterpart():
    """Not the best of three seeds: the median one by test top-1, and the row after it is its counterpart."""
    by_name = {r["name"]: r for r in ZOO}
    names = model_zoo.start_here(by_name)
    seeds = sorted((by_name[f"dfs_po_lowbit_cp1.2_s{s}"]["test"]["top1"], s) for s in range(3))
    assert names[-2] == f"dfs_po_lowbit_cp1.2_s{seeds[1][1]}" == "dfs_po_lowbit_cp1.2_s0"  # 92.39 < 92.41 < 92.55
    with open(os.path.join(ROOT, "results", "fashion-mnist-round3", "results.json")) as f:
        record = json.load(f)["runs"][f"static_of_{names[-2]}"]
    counterpart = by_name[names[-1]]
    assert record["match"] == names[-2] and record["same_as"] == f"round2:{names[-1]}"
    assert counterpart["test"]["top1"] == record["test"]["accuracy"] == 92.55
    with open(os.path.join(ROOT, "docs", "model_zoo.md")) as f:
        page = f.read().split("```python", 1)[0]
    assert f"[`{counterpart['hub']}`]" in page and "static counterpart of `dfs_po_lowbit_cp1_2_s0`" in page
    assert "dfs_po_lowbit_cp1_2_s1" not in page


def test_every_released_checkpoint_is_listed_with_its_size_and_sha256():
    released = sorted(os.path.relpath(p, ROOT) for folder in ("fashion-mnist", "fashion-mnist-dynamic", "fashion-mnist-round3")
                      for p in glob.glob(os.path.join(ROOT, "results", folder, "checkpoints", "*.pth")))
    assert sorted(r["file"] for r in ZOO) == released and len(released) == 105
    with open(os.path.join(ROOT, "docs", "model_zoo.md")) as f:
        text = f.read()
    for r in ZOO:
        with open(os.path.join(ROOT, r["file"]), "rb") as f:
            raw = f.read()
        assert (len(raw), hashlib.sha256(raw).hexdigest()) == (r["size_bytes"], r["sha256"]), r["file"]
        assert f"](../{r['file']}) |" in text and f"| {r['size_bytes']} | `{r['sha256'][:12]}` |" in text
    # the interval is Wilson's on the count correct: round 1's backbone, 9,320 of 10,000
    backbone = next(r for r in ZOO if r["name"] == "backbone")["test"]
    assert backbone["correct"] == 9320 and backbone["images"] == 10000
    assert backbone["interval_95"] == [92.6898, 93.677] and "| 93.20 [92.69, 93.68] |" in text


@pytest.fixture
def hub_here(monkeypatch):
    """torch.hub.list and help take a GitHub repository only (no source="local" in this torch): the
    download is replaced by this checkout, the rest is torch's own code."""
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *args, **kwargs: ROOT)
    return "owner/dfs"


def test_hub_lists_every_architecture_and_checkpoint_with_a_one_line_docstring(hub_here):
    names = torch.hub.list(hub_here)
    assert sorted(names) == sorted({r["hub"] for r in ZOO} | set(models.MODELS) | {"transform"})
    for name in names:
        doc = torch.hub.help(hub_here, name)
        assert doc and doc == doc.strip() and "\n" not in doc, name
    assert "test top-1 93.08 % (95 % interval [92.57, 93.56]) at 19.79 % computation" in torch.hub.help(hub_here, "dfs_cp20_s0")


def test_hub_loads_every_released_checkpoint_as_eval_does():
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for r in ZOO:
        model = torch.hub.load(ROOT, r["hub"], source="local", pretrained=True)
        reference, _ = evaluation.load_model(os.path.join(ROOT, r["file"]), "cpu")
        assert not model.training, r["hub"]
        with torch.no_grad():
            got, want = evaluation.split_output(model(x)), evaluation.split_output(reference.eval()(x))
        assert torch.equal(got[0], want[0]), r["hub"]
        assert (got[1] is None) == (want[1] is None) and (got[1] is None or torch.equal(got[1], want[1])), r["hub"]


def test_hub_builds_architectures_and_untrained_checkpoint_networks_and_refuses_a_changed_file():
    net = torch.hub.load(ROOT, "dfs_resnet38", source="local", num_classes=100, options="paper")
    assert net.option_names == ["skip", "8-bit", "16-bit", "full"] and net.fc.out_features == 100
    assert torch.hub.load(ROOT, "resnet20", source="local").fc.out_features == 10
    with pytest.raises(ValueError):
        torch.hub.load(ROOT, "resnet20", source="local", options="paper")
    untrained = torch.hub.load(ROOT, "static_8_s0", source="local", pretrained=False)
    trained = torch.hub.load(ROOT, "static_8_s0", source="local")
    assert untrained.option_names == trained.option_names == ["8-bit"]
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (untrained, trained)]
    assert shapes[0] == shapes[1]
    assert not torch.equal(untrained.fc.weight, trained.fc.weight)
    hubconf = load_file("hubconf_under_test", "hubconf.py")
    row = next(r for r in ZOO if r["hub"] == "static_8_s0")
    with pytest.raises(RuntimeError, match="sha256"):
        hubconf._checkpoint(dict(row, sha256="0" * 64))()


def test_hub_transform_makes_raw_fashion_mnist_the_input_the_data_pipeline_makes(tmp_path):
    """A [N, 1, 28, 28] uint8 batch as it comes, through the hub's transform and model: the same
    input and logits as the evaluation pipeline's batch of the same images (IDX files written here)."""
    from test_data import write_idx
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 3, 9, 1, 4], dtype=torch.uint8)
    for name, magic, t in zip(data.FASHION_FILES, (2051, 2049, 2051, 2049), (images, labels, images, labels)):
        write_idx(tmp_path / name, magic, t)
    pipeline, _ = next(iter(data.test_batches("fashion-mnist", tmp_path, 5)))
    prep = torch.hub.load(ROOT, "transform", source="local")
    model = torch.hub.load(ROOT, "dfs_cp20_s0", source="local")
    for raw in (images.unsqueeze(1), images):  # [N, 1, 28, 28] and [N, 28, 28]
        assert torch.equal(prep(raw), pipeline)
    with torch.no_grad():
        logits, decisions = model(prep(images.unsqueeze(1)))
        assert torch.equal(logits, model(pipeline)[0]) and logits.shape == (5, 10)
    assert decisions.shape == (5, len(model.gate_embeds), len(model.options))
    with pytest.raises(ValueError, match="uint8"):
        prep(images.float())
    with pytest.raises(ValueError, match="unknown dataset"):
        torch.hub.load(ROOT, "transform", source="local", dataset="mnist")


def test_each_rows_command_parses_back_to_the_arguments_stored_in_its_file():
    """The zoo's stage command of a file, read by that stage's own parser, gives the file's stored
    arguments (all but where it ran: device, paths of the machine, print frequency)."""
    import shlex
    import train_base
    import train_dfs
    import train_gate_init
    from core.checkpoint import load_checkpoint
    from core.settings import build_parser
    stages = {"train_base.py": train_base.STAGE, "train_gate_init.py": train_gate_init.STAGE,
              "train_dfs.py": train_dfs.STAGE}
    compared = 0
    for r in ZOO:
        words = shlex.split(r["command"])
        parsed = vars(build_parser(stages[words[1]]).parse_args(words[2:]))
        stored = load_checkpoint(os.path.join(ROOT, r["file"]))["args"]
        for name, value in parsed.items():
            if name in model_zoo.NOT_IN_COMMAND or name in ("resume", "save_folder") or name not in stored:
                continue
            if name == "policy" and value is not None:  # stored as given: "8" or "8-bit" alike
                value, stored_value = value.split(","), [str(o).removesuffix("-bit") for o in stored[name]]
            else:
                stored_value = stored[name]
            assert value == stored_value, (r["name"], name, value, stored_value)
            compared += 1
        assert parsed["save_folder"].startswith("runs/") and parsed["arch"] == stored["arch"]
        resume = parsed["resume"]  # a released parent is named by its place in the repository
        assert not resume or resume.startswith("runs/") or os.path.isfile(os.path.join(ROOT, resume)), (r["name"], resume)
    assert compared > 15 * len(ZOO)  # about 19 arguments a file


def test_the_readme_first_screen_snippet_runs_as_written(capsys):
    """The README's "try it" block, with the repository's path filled in: the documented shapes come out, and
    it prints each image's class and computation percentage. Beside it: the pinned torch's size, and the
    CPU-only build."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    intro, rest = text.split("```python\n", 1)
    block = rest.split("```", 1)[0]
    assert text.index(block) < text.index("## The two commands, in detail")  # on the first screen
    beside = intro.rstrip().rsplit("\n\n", 1)[-1]  # the paragraph that introduces it
    assert "5.6 GB" in beside and "pip install torch==2.14.1 --index-url\nhttps://download.pytorch.org/whl/cpu" in beside
    scope = {}
    capsys.readouterr()
    exec(block.replace("path/to/this/repository", ROOT), scope)
    logits, decisions, model = scope["logits"], scope["decisions"], scope["model"]
    assert logits.shape == (4, 10) and decisions.shape == (4, 8, 4)
    assert torch.equal(decisions.sum(2), torch.ones(4, 8))  # one-hot: one option per block
    per_image = [float(model.computation_percentage(decisions[i:i + 1])) for i in range(4)]
    assert capsys.readouterr().out.splitlines() == [
        f"classes: {logits.argmax(1).tolist()}", f"computation % per image: {[round(c, 2) for c in per_image]}"]
