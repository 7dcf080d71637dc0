"""Per-option batch norm (`--bn per-option`, models/norms.py), a departure flag off by default.

Each option of a gated block normalises with its own BN, whose statistics come only from the
images routed to it. Pinned here: the routed BN against nn.BatchNorm2d on the routed images; one
option equals the shared-BN network; the fast paths equal the mixed formulation bit for bit;
statistics move only with the routed images; a static policy ignores the flag; loading from
shared-BN checkpoints; the flag through the stage scripts, the checkpoint and eval.py.
"""
import copy

import pytest
import torch
import torch.nn as nn

import helpers
from models import build_model
from models.norms import routed_batch_norm
from test_execution import assert_same_step, batch, step, steer


@pytest.mark.parametrize("momentum", [0.1, None])
def test_routed_batch_norm_is_batch_norm_of_the_routed_images(momentum):
    """Independent computation: nn.BatchNorm2d in training on x[routed] alone."""
    torch.manual_seed(0)
    x = torch.randn(9, 4, 5, 5, dtype=torch.float64) * torch.linspace(0.5, 3, 9, dtype=torch.float64).view(-1, 1, 1, 1)
    routed = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0], dtype=torch.bool)
    mine, ref = (nn.BatchNorm2d(4, momentum=momentum).double() for _ in range(2))
    helpers.randomize_bn(mine)
    ref.load_state_dict(mine.state_dict())
    for _ in range(2):  # twice: the running estimate and num_batches_tracked (momentum None) follow
        out, expected = routed_batch_norm(mine, x, routed), ref(x[routed])
        torch.testing.assert_close(out[routed], expected, rtol=1e-12, atol=1e-12)
        for name, buf in ref.named_buffers():
            torch.testing.assert_close(getattr(mine, name), buf, rtol=1e-12, atol=0, msg=name)
    # the other images are normalised with the routed images' statistics
    mean, var = x[routed].mean((0, 2, 3)), x[routed].var((0, 2, 3), unbiased=False)
    by_hand = (x - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + mine.eps).sqrt() * mine.weight.view(1, -1, 1, 1) \
        + mine.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, by_hand, rtol=1e-12, atol=1e-12)


def test_routed_batch_norm_with_no_image_routed_uses_and_keeps_the_running_statistics():
    bn = nn.BatchNorm2d(3).double()
    helpers.randomize_bn(bn)
    before = copy.deepcopy(bn.state_dict())
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    out = routed_batch_norm(bn, x, torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(out, bn.eval()(x), rtol=1e-12, atol=1e-12)
    for k, v in before.items():
        assert torch.equal(bn.state_dict()[k], v), k
    out.sum().backward()  # the output depends on x through the running statistics only
    torch.testing.assert_close(x.grad, (bn.weight / (bn.running_var + bn.eps).sqrt()).view(1, -1, 1, 1).expand_as(x))


def per_option_pair(options, pattern="spread", dtype=torch.float32, **kw):
    """(shared-BN model, the same weights with per-option BN), in training mode."""
    torch.manual_seed(0)
    shared = build_model("dfs_resnet20", 10, options, **kw).to(helpers.DEVICE, dtype)
    helpers.randomize_bn(shared)
    steer(shared, pattern)
    per = build_model("dfs_resnet20", 10, options, bn="per-option", **kw).to(helpers.DEVICE, dtype)
    per.load_shared_bn(shared.state_dict())
    return shared.train(), per.train()


def as_shared_name(name, option):
    """A per-option parameter or buffer name as the shared network calls it."""
    if not name.startswith("option_norms."):
        return name
    _, g, opt, rest = name.split(".", 3)
    assert opt == option
    return f"blocks.{int(g) + 1}.{rest}"


@pytest.mark.parametrize("options,option", [("8", "8-bit"), ("full", "full")])
def test_one_option_equals_the_shared_bn_network(options, option):
    """One option: every image is routed to it, so its BN is the shared one (float64)."""
    shared, per = per_option_pair(options, dtype=torch.float64)
    x, y = batch()
    x = x.double()
    loss_s, grads_s, bufs_s, _ = step(shared, x, y, "dynamic")
    loss_p, grads_p, bufs_p, _ = step(per, x, y, "dynamic")
    torch.testing.assert_close(loss_p, loss_s, rtol=1e-12, atol=0)
    # the shared bn1/bn2 of gated blocks are unused with per-option BN: no gradient, never updated
    assert {as_shared_name(n, option) for n in grads_p} == set(grads_s)
    for n, g in grads_p.items():
        torch.testing.assert_close(g, grads_s[as_shared_name(n, option)], rtol=1e-9, atol=1e-12, msg=n)
    for n, b in bufs_p.items():
        if n.startswith("option_norms.") or not n.startswith("blocks.") or n.startswith("blocks.0."):
            torch.testing.assert_close(b, bufs_s[as_shared_name(n, option)], rtol=1e-9, atol=1e-12, msg=n)
    per.eval(), shared.eval()
    torch.testing.assert_close(per(x)[0], shared(x)[0], rtol=1e-9, atol=1e-12)


PER_OPTION_CASES = [  # (options, gate pattern, stage 2)
    ("default", "spread", False),
    ("skip,2,3,4", "spread", False),
    ("paper", "spread", True),
    ("default", "skip", False),
    ("default", "8", False),
]


@pytest.mark.parametrize("options,pattern,frozen", PER_OPTION_CASES)
def test_per_option_sparse_training_step_equals_mixed(options, pattern, frozen):
    """The sparse backward against execution="mixed": loss, every gradient, every buffer, bit for bit."""
    _, sparse = per_option_pair(options, pattern)
    if frozen:
        gate = {id(p) for p in [*sparse.gate.parameters(), *sparse.gate_embeds.parameters()]}
        for p in sparse.parameters():
            p.requires_grad_(id(p) in gate)
    dense = copy.deepcopy(sparse)
    x, y = batch()
    a, b = step(sparse, x, y, "dynamic"), step(dense, x, y, "mixed")
    assert_same_step(a, b)
    if pattern == "spread" and not frozen:  # every trainable parameter gets a gradient (DDP needs it)
        unused = {id(p) for p in sparse.unused_parameters()}
        assert {n for n, p in sparse.named_parameters() if id(p) not in unused} == set(a[1])


def test_per_option_optimizer_steps_stay_equal_and_eval_paths_agree():
    _, sparse = per_option_pair("default")
    dense = copy.deepcopy(sparse)
    unused = {id(p) for p in sparse.unused_parameters()}
    opts = [torch.optim.SGD([p for p in m.parameters() if id(p) not in unused or m is dense], lr=0.05, momentum=0.9,
                            weight_decay=1e-4) for m in (sparse, dense)]
    for i in range(3):
        x, y = batch(seed=10 + i)
        assert_same_step(step(sparse, x, y, "dynamic", seed=i), step(dense, x, y, "mixed", seed=i))
        for o in opts:
            o.step()
    for (n, p), q in zip(sparse.named_parameters(), dense.parameters()):
        assert torch.equal(p, q), n
    with torch.no_grad():  # activation ranges from a training pass (they start at 0: constant inputs)
        sparse(batch(16, seed=5)[0])
    sparse.eval().double()  # float64: fp32 rounding of a subset's conv can cross a quantization step
    x, _ = batch(16, seed=4)
    dyn, mixed = sparse(x.double()), sparse(x.double(), execution="mixed")
    assert torch.equal(dyn[1], mixed[1]) and len(set(dyn[1].argmax(2).flatten().tolist())) > 2
    torch.testing.assert_close(dyn[0], mixed[0], rtol=1e-9, atol=1e-9)


def test_eval_uses_the_chosen_options_own_batch_norm():
    """Changing one option's BN changes exactly the images routed to that option."""
    _, model = per_option_pair("default")
    with torch.no_grad():  # activation ranges from a training pass (they start at 0: constant inputs)
        model(batch(16, seed=5)[0])
    model.eval()
    x, _ = batch(16, seed=4)
    logits, decisions = model(x)
    choice = decisions.argmax(2)
    k = int(choice[:, 0].mode().values)  # the first gated block's most chosen option
    name = model.option_names[k]
    with torch.no_grad():
        model.option_norms[0][name]["bn2"].bias.add_(1.0)
    moved = (model(x, force_option=choice)[0] - logits).abs().amax(1) > 1e-6
    assert torch.equal(moved, choice[:, 0] == k)


def test_statistics_move_only_with_the_images_routed_to_the_option():
    """Images forced to skip everywhere, or to full everywhere: changing the ones routed to skip leaves
    full's statistics unchanged bit for bit, and 8 bits (chosen by none) keeps its own entirely.
    The ungated stem and block 1 run in eval mode, so no batch statistic couples the images there."""
    _, model = per_option_pair("skip,8,full")
    model.bn1.eval(), model.blocks[0].eval()
    start = copy.deepcopy(model.state_dict())
    g = len(model.gate_embeds)
    force = torch.tensor([0] * 4 + [2] * 4).view(-1, 1).expand(8, g)  # 4 images skip, 4 run full
    x, _ = batch()
    states = []
    for changed in (x, torch.cat([x[:4] * 3 + 1, x[4:]])):
        model.load_state_dict(start)
        with torch.no_grad():
            model(changed, force_option=force)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    full = [k for k in start if ".full." in k]
    assert full and all(torch.equal(states[0][k], states[1][k]) for k in full)
    assert any(not torch.equal(states[0][k], start[k]) for k in full if "running_mean" in k)
    skip_bn = [k for k in start if k.startswith("blocks.") and "shortcut_bn.running" in k]  # skip's own
    assert skip_bn and all(not torch.equal(states[0][k], states[1][k]) for k in skip_bn)
    eight = [k for k in start if ".8-bit." in k]
    assert eight and all(torch.equal(states[0][k], start[k]) for k in eight)


def test_a_static_policy_is_unchanged_by_the_flag():
    torch.manual_seed(0)
    a = build_model("dfs_resnet20", 10, "skip,2,3,4", policy="3,skip,2,4,4,3,skip,2")
    torch.manual_seed(0)
    b = build_model("dfs_resnet20", 10, "skip,2,3,4", policy="3,skip,2,4,4,3,skip,2", bn="per-option")
    assert b.bn == "shared" and a.state_dict().keys() == b.state_dict().keys()
    x, y = batch()
    for mode in ("train", "eval"):
        a.train(mode == "train"), b.train(mode == "train")
        assert torch.equal(a(x)[0], b(x)[0])
    with pytest.raises(ValueError, match="batch-norm mode"):
        build_model("dfs_resnet20", 10, "skip,2", policy="2", bn="per-options")


def test_loading_shared_checkpoints_starts_every_option_from_the_shared_bn():
    torch.manual_seed(0)
    plain = build_model("resnet20")
    helpers.randomize_bn(plain)
    per = build_model("dfs_resnet20", 10, "paper", bn="per-option")
    per.load_backbone(plain.state_dict())
    shared = build_model("dfs_resnet20", 10, "paper")
    shared.load_backbone(plain.state_dict())
    for name in ("8-bit", "16-bit", "full"):
        for n, v in per.option_norms[3][name].state_dict().items():
            assert torch.equal(v, plain.blocks[4].state_dict()[n]), (name, n)
    per2 = build_model("dfs_resnet20", 10, "paper", bn="per-option")
    per2.load_shared_bn(shared.state_dict())
    assert all(torch.equal(v, per.state_dict()[k]) for k, v in per2.state_dict().items() if "gate" not in k)
    with pytest.raises(ValueError, match="not a shared-BN state"):
        per2.load_shared_bn(per.state_dict())


def test_the_flag_through_the_stages_the_checkpoint_and_eval(tmp_path, capsys):
    """--bn per-option: stage 2 from a backbone, stage 3 from a shared-BN stage 2 (options start as the
    shared BN), continued with the flag inherited; the checkpoint's model config holds it and eval.py
    rebuilds it; a shared-BN stage 3 from a per-option checkpoint is refused in one line."""
    from core import engine
    import eval as eval_script
    import train_dfs
    import train_gate_init
    from core.checkpoint import load_checkpoint
    from test_static import stages
    shared_gate, common = stages(tmp_path)
    base = str(tmp_path / "base" / "resnet20" / "model_best.pth.tar")
    per_gate = tmp_path / "gate_per" / "dfs_resnet20" / "checkpoint_latest.pth.tar"
    assert engine.main(train_gate_init.STAGE, ["train", "dfs_resnet20", *common, "--iters", "1", "--options",
                                               "skip,8,full", "--bn", "per-option", "--resume", base,
                                               "--save-folder", str(per_gate.parents[1])]) == 0
    ckpt = load_checkpoint(str(per_gate))
    assert ckpt["model_config"]["bn"] == "per-option" and ckpt["args"]["bn"] == "per-option"
    assert any(k.startswith("option_norms.") for k in ckpt["model"])
    dfs = tmp_path / "dfs" / "dfs_resnet20" / "checkpoint_latest.pth.tar"
    stage3 = ["train", "dfs_resnet20", *common, "--save-folder", str(dfs.parents[1])]
    assert engine.main(train_dfs.STAGE, [*stage3, "--iters", "1", "--resume", shared_gate, "--bn", "per-option"]) == 0
    assert load_checkpoint(str(dfs))["model_config"]["bn"] == "per-option"
    # continue to 2 iterations without the flag: taken from the run
    assert engine.main(train_dfs.STAGE, [*stage3, "--iters", "2", "--resume", str(dfs)]) == 0
    assert load_checkpoint(str(dfs))["step"] == 2
    capsys.readouterr()
    assert eval_script.main([str(dfs), "--dataset", "synthetic", "--device", "cpu"]) == 0
    assert "top-1 accuracy" in capsys.readouterr().out
    # the shared BN of a gated block never runs with per-option BN: the parent's values, untouched
    assert torch.equal(load_checkpoint(str(dfs))["model"]["blocks.2.bn1.running_mean"],
                       load_checkpoint(shared_gate)["model"]["blocks.2.bn1.running_mean"])
    refused = ["train", "dfs_resnet20", *common, "--iters", "1", "--resume", str(per_gate), "--bn", "shared",
               "--save-folder", str(tmp_path / "refused")]
    assert engine.main(train_dfs.STAGE, refused) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "per-option batch norms" in err
    assert engine.main(train_dfs.STAGE, [*stage3, "--iters", "3", "--resume", str(dfs), "--bn", "shared"]) == 2
    assert "--bn shared differs" in capsys.readouterr().err
