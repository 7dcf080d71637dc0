"""The static-vs-dynamic study's tools: static policies, the policy search, eval's controls, significance.

None of these is part of the paper; they are the baselines and statistics a sceptical reader asks
for (does choosing per input beat a fixed network of the same cost?).
"""
import copy
import itertools
import json
import math

import pytest
import torch

import eval as eval_script
import train_base
import train_dfs
import train_gate_init
from core import engine, evaluation
from core.checkpoint import load_checkpoint
from core.evaluation import model_config
from helpers import DEVICE, images, randomize_bn, small_synthetic, spread_gate
from models import build_model, parse_policy
from study import search_policy, significance

PAPER = ("skip", 8, 16, "full")
POLICY = ("skip", 8, 16, "full", 8, 8, "skip", "full")  # 8 gated blocks of a ResNet-20


def by_hand(model, x, policy):
    """The static network written out: each gated block runs its option, independently of forward()."""
    x = model.blocks[0](model.stem(x))
    for block, option in zip(model.blocks[1:], policy):
        x = block.shortcut(x) if option == "skip" else block(x, None if option == "full" else option)
    return model.head(x)


@pytest.mark.parametrize("training", [False, True])
def test_static_policy_forward_equals_each_block_forced(training):
    torch.manual_seed(0)
    gated = build_model("dfs_resnet20", options=PAPER).to(DEVICE)
    randomize_bn(gated)
    static = build_model("dfs_resnet20", options=PAPER, policy=POLICY).to(DEVICE)
    static.load_state_dict(gated.state_dict())
    for m in (gated, static):
        m.train(training)
    x = images(6)
    reference = by_hand(gated, x, POLICY)
    logits, decisions = static(x)
    indices = [PAPER.index(o) for o in POLICY]
    assert torch.equal(logits, reference)
    assert torch.equal(decisions.argmax(2), torch.tensor(indices, device=DEVICE).expand(6, 8))
    # the same policy given per input to the gated network (its grouped or mixed path)
    per_input = gated(x, force_option=torch.tensor(indices).expand(6, 8))[0]
    assert torch.allclose(per_input, reference, atol=1e-5)
    assert torch.equal(gated(x, force_option=indices)[0], reference)


def test_static_policy_computation_percentage_by_hand():
    static = build_model("dfs_resnet20", options=PAPER, policy=POLICY)
    _, decisions = static.eval()(images(3))
    # costs 0, 1/16, 1/4, 1, 1/16, 1/16, 0, 1: sum 2.4375 over 8 blocks = 30.46875 %
    assert static.computation_percentage(decisions).item() == 30.46875
    assert static.policy_names() == ["skip", "8-bit", "16-bit", "full", "8-bit", "8-bit", "skip", "full"]


def test_parse_policy():
    assert parse_policy("8-bit", PAPER, 3) == (1, 1, 1)
    assert parse_policy(["skip", "16", "full"], PAPER, 3) == (0, 2, 3)
    with pytest.raises(ValueError, match="3 expected, got 2"):
        parse_policy("8,16", PAPER, 3)
    with pytest.raises(ValueError, match=r"'4' is not among the model's options"):
        parse_policy("4,8,8", PAPER, 3)
    with pytest.raises(ValueError, match="unknown option 'x'"):
        parse_policy("x,8,8", PAPER, 3)


@pytest.fixture(autouse=True)
def small_world():
    with small_synthetic(160, 64):
        yield


def stages(tmp_path, options="skip,8,full"):
    """Stage 1 and 2 on synthetic data with a held-out split; returns the stage-2 checkpoint."""
    common = ["--dataset", "synthetic", "--device", "cpu", "--batch-size", "16", "--val-size", "32",
              "--print-freq", "1"]
    assert engine.main(train_base.STAGE, ["train", "resnet20", *common, "--iters", "2",
                                          "--save-folder", str(tmp_path / "base")]) == 0
    assert engine.main(train_gate_init.STAGE, [
        "train", "dfs_resnet20", *common, "--iters", "1", "--options", options,
        "--resume", str(tmp_path / "base" / "resnet20" / "model_best.pth.tar"),
        "--save-folder", str(tmp_path / "gate")]) == 0
    return str(tmp_path / "gate" / "dfs_resnet20" / "checkpoint_latest.pth.tar"), common


def test_stage3_with_a_static_policy(tmp_path, capsys):
    """train_dfs.py --policy FILE: the gate never trains, the backbone does, the checkpoint keeps the
    policy, eval.py reports its exact cost, and a resume with another policy is refused."""
    parent, common = stages(tmp_path)
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"policy": ["skip", "8-bit", "full", "8", "skip", "full", "full", "8"]}))
    argv = ["train", "dfs_resnet20", *common, "--iters", "2", "--resume", parent,
            "--policy", str(policy_file), "--save-folder", str(tmp_path / "static")]
    assert engine.main(train_dfs.STAGE, argv) == 0
    before, after = load_checkpoint(parent), load_checkpoint(str(tmp_path / "static/dfs_resnet20/checkpoint_latest.pth.tar"))
    assert model_config(after)["policy"] == ["skip", "8-bit", "full", "8-bit", "skip", "full", "full", "8-bit"]
    for key, value in before["model"].items():
        trained = not torch.equal(value, after["model"][key])
        if key.startswith(("gate.", "gate_embeds.", "blocks.1.conv", "blocks.5.conv")):  # blocks 1, 5 skipped
            assert not trained, key
        elif key.endswith("weight") and key.startswith(("blocks.2.conv", "blocks.3.bn", "fc.")):
            assert trained, key
    out = tmp_path / "r.json"
    assert eval_script.main([str(tmp_path / "static/dfs_resnet20/model_best.pth.tar"), "--dataset", "synthetic",
                            "--device", "cpu", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["computation_percentage"] == 100 * (3 / 16 + 3) / 8  # three 8-bit, three full, two skipped
    assert record["policy"] == model_config(after)["policy"]
    capsys.readouterr()
    assert engine.main(train_dfs.STAGE, ["train", "dfs_resnet20", *common, "--iters", "3", "--policy", "8",
                                         "--resume", str(tmp_path / "static/dfs_resnet20/checkpoint_latest.pth.tar"),
                                         "--save-folder", str(tmp_path / "static")]) == 2
    assert "--policy 8 differs from the run" in capsys.readouterr().err
    assert engine.main(train_dfs.STAGE, ["train", "dfs_resnet20", *common, "--iters", "2", "--policy", "4",
                                         "--resume", parent, "--save-folder", str(tmp_path / "bad")]) == 2
    assert "'4' is not among the model's options" in capsys.readouterr().err


def additive(drops, base=90.0, extra=None):
    """A hand-made accuracy: base minus the summed per-block drops (plus `extra` penalties)."""
    def accuracy(policy):
        return base - sum(drops[g][k] for g, k in enumerate(policy)) - (extra or {}).get(policy, 0.0)
    return accuracy


# options skip, 4-bit, 8-bit: 0, 16, 64 units of 1/1024 block; 3 blocks = 3072 units
UNITS = [0, 16, 64]
DROPS = [[10.0, 1.0, 0.0], [0.5, 0.2, 0.0], [5.0, 0.1, 0.0]]


def test_search_finds_the_hand_worked_policy():
    # target 96 units = 3.125 %, window 0.2 % (6.1 units): totals 90..96 are (8,4,4), (4,8,4), (4,4,8),
    # with summed drops 0.3, 1.1, 1.2
    policy, acc, log = search_policy.search(additive(DROPS), UNITS, 3, 3.125)
    assert policy == (2, 1, 1) and acc == pytest.approx(89.7)
    assert len(log) == 1 + 3 * 2 + 3  # the reference, every single change, and the three in the window
    assert search_policy.percentage(policy, UNITS) == 3.125


def test_search_verifies_what_the_sum_predicts():
    # (8,4,4) is predicted best, but measured 5 points worse: the next prediction, (4,8,4), wins
    policy, acc, _ = search_policy.search(additive(DROPS, extra={(2, 1, 1): 5.0}), UNITS, 3, 3.125)
    assert policy == (1, 2, 1) and acc == pytest.approx(88.9)
    with pytest.raises(ValueError, match="no static policy costs between"):
        search_policy.search(additive(DROPS), UNITS, 3, 0.3, window=0.1)  # 9.2 units: only 0 fits


def test_knapsack_is_exact():
    best = search_policy.knapsack(DROPS, UNITS, 0, 200, keep=2)
    for total, entries in best.items():  # brute force over all 27 policies
        same = [p for p in itertools.product(range(3), repeat=3) if sum(UNITS[k] for k in p) == total]
        drops = sorted(sum(DROPS[g][k] for g, k in enumerate(p)) for p in same)[:2]
        assert [d for d, _ in entries] == pytest.approx(drops)
        assert all(sum(DROPS[g][k] for g, k in enumerate(p)) == pytest.approx(d) for d, p in entries)
    assert sorted(best) == sorted({sum(UNITS[k] for k in p) for p in itertools.product(range(3), repeat=3)
                                   if sum(UNITS[k] for k in p) <= 200})


def test_search_command_end_to_end(tmp_path):
    parent, _ = stages(tmp_path, options="skip,4,8")
    out = tmp_path / "policy.json"
    assert search_policy.main([parent, "--target", "3", "--window", "1", "--out", str(out), "--device", "cpu",
                               "--batch-size", "32", "--calibrate-batches", "2", "--verify", "2"]) == 0
    record = json.loads(out.read_text())
    assert len(record["policy"]) == 8 and 2 <= record["computation_percentage"] <= 3
    cp = 100 * sum({"skip": 0, "4-bit": 16, "8-bit": 64}[o] for o in record["policy"]) / (8 * 1024)
    assert record["computation_percentage"] == cp
    assert len(record["evaluations"]) >= 1 + 8 * 2
    # --cache: a second search of the same checkpoint measures nothing again and answers the same
    cached = tmp_path / "cache.json"
    argv = [parent, "--target", "3", "--window", "1", "--device", "cpu", "--batch-size", "32",
            "--calibrate-batches", "2", "--verify", "2", "--cache", str(cached)]
    assert search_policy.main([*argv, "--out", str(tmp_path / "a.json")]) == 0
    assert search_policy.main([*argv, "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["measured_here"] == len(a["evaluations"]) and b["measured_here"] == 0
    assert a["policy"] == b["policy"] == record["policy"] and a["evaluations"] == b["evaluations"]
    assert search_policy.main([*argv[:-1], str(out), "--out", str(tmp_path / "c.json")]) == 2  # not a cache
    assert search_policy.main([str(tmp_path / "base/resnet20/model_best.pth.tar"), "--target", "3",
                               "--out", str(out), "--device", "cpu"]) == 2


def test_controls_keep_counts_and_majority_is_the_static_policy(tmp_path):
    torch.manual_seed(0)
    model = build_model("dfs_resnet20", options=PAPER).to(DEVICE)
    for seed in range(3):  # BN and range statistics from a few training forwards
        model(images(8, seed=10 + seed))
    spread_gate(model)
    model.eval()
    x, y = images(40), torch.randint(0, 10, (40,), device=DEVICE)
    batches = [(x[:16], y[:16]), (x[16:32], y[16:32]), (x[32:], y[32:])]
    real = evaluation.evaluate(model, batches, per_image=True)
    choices = real["choices"]
    assert len({tuple(c) for c in choices.tolist()}) > 1  # the gate does depend on the input
    controls = eval_script.controls(choices, seed=3)
    shuffled = controls["shuffled"]
    assert not torch.equal(shuffled, choices)
    for g in range(choices.shape[1]):
        assert torch.equal(torch.bincount(shuffled[:, g], minlength=4), torch.bincount(choices[:, g], minlength=4))
    assert torch.equal(eval_script.controls(choices, seed=3)["shuffled"], shuffled)  # seeded
    stats = evaluation.evaluate(model, batches, force=shuffled, per_image=True)
    assert torch.equal(stats["choices"], shuffled)
    assert stats["computation_percentage"] == real["computation_percentage"]
    majority = controls["majority"][0]
    for g in range(choices.shape[1]):
        assert torch.bincount(choices[:, g], minlength=4)[majority[g]] == torch.bincount(choices[:, g]).max()
    forced = evaluation.evaluate(model, batches, force=controls["majority"], per_image=True)
    static = build_model("dfs_resnet20", options=PAPER, policy=[PAPER[k] for k in majority.tolist()]).to(DEVICE)
    static.load_state_dict(model.state_dict())
    expected = evaluation.evaluate(static, batches, per_image=True)
    assert torch.equal(forced["correct"], expected["correct"]) and forced["acc"] == expected["acc"]
    assert forced["computation_percentage"] == expected["computation_percentage"]


def test_eval_controls_and_significance_end_to_end(tmp_path, capsys):
    parent, _ = stages(tmp_path)
    out = tmp_path / "r.json"
    assert eval_script.main([parent, "--dataset", "synthetic", "--device", "cpu", "--controls",
                            "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"shuffled", "row_shuffled", "majority"} <= set(record["controls"]) <= {
        "shuffled", "row_shuffled", "majority", "matched_majority"}
    for name in ("shuffled", "row_shuffled"):
        assert record["controls"][name]["computation_percentage"] == record["computation_percentage"]
        assert record["controls"][name]["cost_difference"] == 0
    for control in record["controls"].values():
        assert control["cost_difference"] == control["computation_percentage"] - record["computation_percentage"]
    n = record["num_samples"]
    assert significance.correctness(record).sum().item() == round(record["accuracy"] * n / 100)
    shuffled = tmp_path / "s.json"
    shuffled.write_text(json.dumps({**record["controls"]["shuffled"], "num_samples": n}))
    capsys.readouterr()
    assert significance.main([str(out), str(shuffled)]) == 0
    assert "McNemar exact p" in capsys.readouterr().out
    plain = tmp_path / "plain.json"
    assert eval_script.main([parent, "--dataset", "synthetic", "--device", "cpu", "--json", str(plain)]) == 0
    assert significance.main([str(out), str(plain)]) == 2
    assert "run eval.py --per-image" in capsys.readouterr().err


def test_significance_by_hand():
    a = torch.tensor([1, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    # A alone right at 1, 2, 6; B alone at 4: (3 - 1) / 8 = 25 points
    assert significance.paired_difference(a, b) == (25.0, 3, 1)
    # 4 discordant pairs, min 1: 2 * (C(4,0) + C(4,1)) / 2^4 = 10/16
    assert significance.mcnemar_exact(a, b) == 0.625
    assert significance.mcnemar_exact(a, a) == 1.0
    # 10 discordant, all one way: 2 / 2^10
    assert significance.mcnemar_exact(torch.ones(10, dtype=torch.bool), torch.zeros(10, dtype=torch.bool)) == 2 / 1024
    # t_{0.975, 2} = 4.302653 (tables); values 1, 2, 3: mean 2, sd 1
    mean, lo, hi = significance.t_interval([1, 2, 3])
    assert mean == 2 and hi - 2 == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5) and lo == pytest.approx(4 - hi)
    assert significance.student_t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert significance.student_t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)
    bits = torch.tensor([True, False, True] * 7)
    assert torch.equal(significance.unpack_bits(significance.pack_bits(bits), 21), bits)
    with pytest.raises(ValueError, match="a t-interval needs at least two values"):
        significance.t_interval([1.0])


def test_recalibration_routes_each_sample_through_its_chosen_option_only():
    torch.manual_seed(0)
    model = build_model("dfs_resnet20", options=PAPER).to(DEVICE)
    for seed in range(3):
        model(images(8, seed=10 + seed))
    spread_gate(model)
    model.eval()
    x = images(24, seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen, decisions = {}, []
    hooks = [model.blocks[b].bn1.register_forward_hook(lambda m, i, o, b=b: seen.__setitem__(b, seen.get(b, 0) + len(i[0])))
             for b in range(1, 9)] + [model.register_forward_hook(lambda m, i, o: decisions.append(o[1]))]
    evaluation.recalibrate_bn(model, [(x[:12], None), (x[12:], None)])
    for h in hooks:
        h.remove()
    choices = torch.cat(decisions).argmax(2)  # the decisions made during the recalibration passes
    assert len(torch.unique(choices)) > 1
    for b in range(1, 9):  # gated block b (decision column b - 1): its convs ran for the non-skipping samples only
        assert seen.get(b, 0) == int((choices[:, b - 1] != 0).sum()), b
    assert not model.training and all(not m.training for m in model.modules())
    assert all(bn.momentum == 0.1 for bn in model.modules() if isinstance(bn, torch.nn.BatchNorm2d))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(".bn" in k or "shortcut_bn" in k or k.startswith("bn1") for k in changed)


def test_eval_recalibrate_flag(tmp_path, capsys):
    parent, _ = stages(tmp_path)
    out = tmp_path / "r.json"
    assert eval_script.main([parent, "--dataset", "synthetic", "--device", "cpu", "--recalibrate", "2",
                             "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["recalibrated"]["batches"] == 2 and "correct_bits" in record["recalibrated"]
    assert "BN recalibrated under its own decisions" in capsys.readouterr().out


def test_row_shuffled_control_moves_whole_decision_rows():
    choices = torch.tensor([[0, 1, 2], [2, 2, 2], [1, 0, 3], [3, 3, 0], [0, 0, 0], [1, 2, 3]])
    rows = eval_script.controls(choices, seed=5)["row_shuffled"]
    assert not torch.equal(rows, choices)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, choices.tolist()))  # each row intact
    for g in range(3):  # hence the same per-block counts and cost
        assert torch.equal(torch.bincount(rows[:, g], minlength=4), torch.bincount(choices[:, g], minlength=4))
    # drawn after the column permutations: round 2's column-shuffled control is unchanged
    g = torch.Generator().manual_seed(5)
    expected = torch.stack([col[torch.randperm(6, generator=g)] for col in choices.T], 1)
    assert torch.equal(eval_script.controls(choices, seed=5)["shuffled"], expected)


def test_matched_majority_by_hand():
    """Options skip,2,3,4 (units 0, 4, 9, 16 of 1024), 2 blocks, 4 images.
    Block 0 chose 4,4,3,skip (16+16+9+0), block 1 2,2,2,4 (4+4+4+16): 69 units / 4 = 17.25 a image,
    so the window is [17 - 4, 17] (4 = the smallest step between two options' costs; 0.1 % of
    2048 units is 2). The majority policy (4, 2) costs 20, too much. In the window: (4, skip) 16 and
    (skip, 4) 16 agree with 2 decisions each, (3, 2) 13 with 1 + 3 = 4, (2, 3) 13 with none."""
    choices = torch.tensor([[3, 1], [3, 1], [2, 1], [0, 3]])
    model = build_model("dfs_resnet20", options="skip,2,3,4")
    counts = torch.stack([torch.bincount(col, minlength=4) for col in choices.T])
    assert eval_script.matched_window([0, 4, 9, 16], 2) == 4
    assert eval_script.matched_majority(counts, [0, 4, 9, 16], 4) == (2, 1)
    # against brute force over every policy of 5 blocks
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        counts = torch.randint(0, 6, (5, 4), generator=g)
        counts[:, 0] += 10 - counts.sum(1).clamp(max=10)  # 10 images or more a block
        n = int(counts.sum(1).min())
        counts[:, 0] -= counts.sum(1) - n  # exactly n images a block
        units, total = [0, 4, 9, 16], int((counts * torch.tensor([0, 4, 9, 16])).sum())
        hi = total // n
        best = max(((sum(int(counts[b, k]) for b, k in enumerate(p)), sum(units[k] for k in p), p)
                    for p in itertools.product(range(4), repeat=5) if hi - 5 <= sum(units[k] for k in p) <= hi),
                   default=None)
        found = eval_script.matched_majority(counts, units, n)
        assert (found is None) == (best is None)
        if found is not None:  # the same agreement and cost (the policy itself may tie)
            assert (sum(int(counts[b, k]) for b, k in enumerate(found)), sum(units[k] for k in found)) == best[:2]
    model_choices = torch.zeros(4, 8, dtype=torch.long)  # every image skips every block: so does the policy
    assert torch.equal(eval_script.controls(model_choices, 0, model)["matched_majority"], model_choices)


def test_pooled_recalibration_weighs_images_by_count():
    """Two batches route 2 and 30 images to BN a, 30 and 2 to BN b: the pooled estimate is the mean and
    variance of all 32 images of each, the call-weighted one the average of the two calls'."""
    class Router(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.never = (torch.nn.BatchNorm2d(2) for _ in range(3))

        def forward(self, x):
            to_a = x[:, 1, 0, 0] > 0
            out = torch.empty_like(x)
            out[to_a], out[~to_a] = self.a(x[to_a]), self.b(x[~to_a])
            return out

    g = torch.Generator().manual_seed(0)
    def part(n, sign, shift):
        x = torch.randn(n, 2, 3, 3, generator=g) * (1 + shift) + shift
        x[:, 1, 0, 0] = sign * (1 + x[:, 1, 0, 0].abs())
        return x
    batches = [(torch.cat([part(2, 1, 3.0), part(30, -1, 0.0)]), None),
               (torch.cat([part(30, 1, 0.0), part(2, -1, 5.0)]), None)]
    for estimator in ("pooled", "call"):
        model = Router()
        randomize_bn(model)
        never = {k: v.clone() for k, v in model.never.state_dict().items()}
        evaluation.recalibrate_bn(model, batches, estimator)
        for bn, sign in ((model.a, 1), (model.b, -1)):
            parts = [x[(x[:, 1, 0, 0] > 0) == (sign > 0)].double() for x, _ in batches]
            if estimator == "pooled":
                every = torch.cat(parts).transpose(0, 1).flatten(1)
                mean, var = every.mean(1), every.var(1)
            else:
                per_call = [p.transpose(0, 1).flatten(1) for p in parts]
                mean = sum(p.mean(1) for p in per_call) / 2
                var = sum(p.var(1) for p in per_call) / 2
            torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-5)
        if estimator == "pooled":  # a BN that no image reached keeps its statistics
            assert all(torch.equal(v, model.never.state_dict()[k]) for k, v in never.items() if "running" in k)
            pooled = model.a.running_mean.clone()
        else:
            assert (pooled - model.a.running_mean).abs().max() > 0.5  # the two estimators differ here
    with pytest.raises(ValueError, match="estimator"):
        evaluation.recalibrate_bn(Router(), batches, "image")


def test_pooled_recalibration_of_one_batch_through_one_option_is_plain_recalibration():
    torch.manual_seed(0)
    model = build_model("dfs_resnet20", options="8").to(DEVICE)
    for seed in range(2):
        model(images(8, seed=10 + seed))
    calibration = [(images(16, seed=3), None)]
    pooled, call = copy.deepcopy(model), copy.deepcopy(model)
    evaluation.recalibrate_bn(pooled, calibration, "pooled")
    evaluation.recalibrate_bn(call, calibration, "call")
    for (k, a), b in zip(pooled.state_dict().items(), call.state_dict().values()):
        if "running_" in k:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_search_cache_gives_the_same_answer_without_measuring_again():
    """Known evaluations are taken, not measured; the answer is the one of a search without them."""
    drops = [[5.0, 2.0, 0.0], [1.0, 0.5, 0.0], [4.0, 3.0, 0.0]]
    calls = []

    def accuracy(policy):
        calls.append(policy)
        return 90.0 - sum(drops[g][k] for g, k in enumerate(policy))
    units = [0, 64, 1024]
    first = search_policy.search(accuracy, units, 3, 40.0, window=10.0)
    measured = len(calls)
    second = search_policy.search(accuracy, units, 3, 40.0, window=10.0, known=dict(first[2]))
    assert second[:2] == first[:2] and len(calls) == measured
    third = search_policy.search(accuracy, units, 3, 70.0, window=10.0, known=dict(first[2]))
    assert third[0] == search_policy.search(accuracy, units, 3, 70.0, window=10.0)[0]


def test_round3_statistics_by_hand():
    """Holm: p sorted 0.01, 0.03, 0.04 -> 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(0.06, 1 x 0.04) = 0.06.
    t-test with df 2 has the closed form p = 1 - |t| / sqrt(2 + t^2): values 1, 2, 3 give
    t = 2 / (1 / sqrt 3) = sqrt 12, p = 1 - sqrt(12 / 14) = 0.0741799."""
    from study import round3_analysis as analysis
    assert analysis.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert analysis.t_test_p([1, 2, 3]) == pytest.approx(1 - math.sqrt(12 / 14), abs=1e-6)
    verdicts = analysis.family({"a": [1.0, 1.1, 0.9], "b": [1.0, -1.0, 0.5], "c": [-2.0, -2.1]})
    assert verdicts["a"][3] == "DFS better" and verdicts["b"][3] == "no difference shown"
    assert verdicts["c"][3].startswith("2 of 3 seeds")


def test_round3_pilot_table_takes_runs_given_their_own_beta():
    """A run given its beta records beta_selected_by None (the pilots themselves); the table still
    names the pilot that the later runs took their beta from."""
    from study import round3_analysis as analysis
    pilot = {"beta": "0.08", "target": 0.8, "val": {"computation_percentage": 0.79, "acc": 90.0},
             "test": {"accuracy": 89.5}, "beta_selected_by": None}
    runs = {"pilot_lowbit_b0.08": pilot, "dfs_po_lowbit_cp0.8_s0": {"beta_selected_by": "pilot_lowbit_b0.08"}}
    rows = analysis.pilots(runs, "lowbit")
    assert "| pilot_lowbit_b0.08 | 0.08 | 0.8 | 0.790 | 90.00 | 89.50 |" in rows
    assert rows[-1] == "Chosen: pilot_lowbit_b0.08."
    assert analysis.pilots({"pilot_lowbit_b0.08": pilot}, "lowbit")[-1] == "Chosen: not yet."
