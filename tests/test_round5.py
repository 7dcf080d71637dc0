"""Round 5's runner and analysis (study/round5.py, study/round5_analysis.py): the plan's runs and
flags, and tier A's rule on hand-made differences."""
import pytest

from study import round5, round5_analysis
from study.round4 import ORACLE as ROUND4_ORACLE


def test_tier_a_is_the_round_4_oracle_with_the_parents_shared_bn():
    runs = [r for r in round5.plan() if r[0] == "A"]
    assert [name for _, name, *_ in runs] == [f"a_oracle_shared_{n}_s{s}" for n in (300, 3000) for s in (0, 1, 2)]
    assert round5_analysis.ORACLE == ROUND4_ORACLE
    flags = round5.oracle_shared_flags(1, 3000)
    assert "--bn" not in flags  # the parent gate_marked_s1 has the shared BN
    assert flags[flags.index("--route-unmarked") + 1] == "skip,skip,8,8,8,8,8,8"
    assert flags[flags.index("--iters") + 1] == "3000" and flags[flags.index("--lr-steps") + 1] == "2250"
    assert flags[flags.index("--seed") + 1] == "1" and flags[flags.index("--beta") + 1] == "0"


def test_tier_b_is_the_control_and_one_gate_only_arm_per_estimator():
    runs = [r for r in round5.plan() if r[0] == "B"]
    assert [name for _, name, *_ in runs] == ["b0_distill_s0", "b1_argmax_s0", "b2_gumbel_s0", "b3_reinforce_s0"]
    b0 = round5.B0
    assert b0[b0.index("--distill-unmarked") + 1] == "skip,skip,8,8,8,8,8,8" and "--train" in b0
    arm = round5.B_ARM
    assert arm[arm.index("--beta") + 1] == "1000" and arm[arm.index("--budget-loss") + 1] == "squared"
    assert arm[arm.index("--minimum") + 1] == "2.34375" and arm[arm.index("--train") + 1] == "gate"
    assert round5.START_B["backbone"].endswith("round4/checkpoints/oracle_3000_s0.pth")
    assert round5.START_B["gate"].endswith("round3/checkpoints/gate_po_marked_s0.pth")


def test_tier_b_criteria_on_a_hand_made_record():
    test = {"routing": {"halves": {"marked": {"computation_percentage": 0.5, "acc": 99.0},
                                   "unmarked": {"computation_percentage": 3.6, "acc": 90.0}},
                        "mark_information_bits": [0.0, 0.6, 0.5, 0.49, 0.9, 0.7, 0.1, 0.0]}}
    assert round5_analysis.routes_by_frame(test)[2:] == (pytest.approx(3.1), 4, True)
    test["routing"]["mark_information_bits"][2] = 0.4
    assert round5_analysis.routes_by_frame(test)[3:] == (3, False)
    test["routing"]["mark_information_bits"][2] = 0.5
    test["routing"]["halves"]["unmarked"]["computation_percentage"] = 3.4
    assert round5_analysis.routes_by_frame(test)[4] is False  # a gap of 2.9 points


def test_tier_a_rule_pays_loses_or_neither():
    verdicts = round5_analysis.pays_or_loses({300: [-12.0, -11.5, -12.4], 3000: [0.5, -0.2, 0.4]})
    assert verdicts[300][3] == "loses" and verdicts[3000][3] == "neither shown"
    assert round5_analysis.pays_or_loses({300: [1.3, 1.6, 1.4], 3000: [0.6, 0.7, 1.0]})[300][3] == "pays"
    # Holm: the larger p of two is compared unadjusted, the smaller doubled
    v = round5_analysis.pays_or_loses({300: [1.3, 1.6, 1.4], 3000: [0.6, 0.7, 1.0]})
    assert v[300][2] == pytest.approx(2 * v[300][1]) and v[3000][2] == pytest.approx(v[3000][1])
    assert round5_analysis.pays_or_loses({300: [1.0, 2.0]})[300][3] == "2 of 3 seeds: not complete"


def test_results_md_is_written_before_any_run(tmp_path):
    round5_analysis.write({}, str(tmp_path))
    text = (tmp_path / "results.md").read_text()
    assert "| 300 | 0 | not run |" in text and "Not run yet" in text


# --- feature 2: a start assembled from two checkpoints ---------------------------------------------

import copy  # noqa: E402

import torch  # noqa: E402

import train_dfs  # noqa: E402
from core import assemble, continuing, engine  # noqa: E402
from core.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from core.evaluation import model_config  # noqa: E402
from helpers import images, randomize_bn, small_synthetic, spread_gate  # noqa: E402
from models import build_model  # noqa: E402

PAPER = ["skip", 8, 16, "full"]
ROUTES = {"marked": ["skip"] * 8, "unmarked": ["skip", "skip"] + ["8"] * 6}


def gated(seed, stage, bn="per-option", routes=None):
    """A checkpoint dict of a randomly initialised ResNet-20 DFS network (BN and ranges made non-trivial)."""
    torch.manual_seed(seed)
    model = build_model("dfs_resnet20", 10, PAPER, bn=bn, routes=routes)
    randomize_bn(model, seed)
    spread_gate(model, seed)
    model.train()
    with torch.no_grad():
        model(images(8, seed=seed))  # range buffers and BN statistics of its own
    config = {"name": "dfs_resnet20", "num_classes": 10, "options": PAPER, "stochastic_act_rounding": False,
              "policy": None, "costs": None, "bn": bn, **({"routes": routes} if routes else {})}
    return model, {"model": copy.deepcopy(model.state_dict()), "stage": stage, "arch": "dfs_resnet20",
                   "num_classes": 10, "step": 7, "options": PAPER, "model_config": config,
                   "args": {"dataset": "synthetic"}}


def test_an_assembled_start_takes_each_part_from_its_source(tmp_path):
    _, backbone = gated(1, "dfs", routes=ROUTES)
    _, gate = gated(2, "gate_init")
    save_checkpoint(backbone, tmp_path / "b.pth")
    save_checkpoint(gate, tmp_path / "g.pth")
    out = tmp_path / "start.pth"
    assert assemble.main(["--backbone", str(tmp_path / "b.pth"), "--gate", str(tmp_path / "g.pth"),
                          "--out", str(out)]) == 0
    ckpt = load_checkpoint(str(out))
    assert ckpt["stage"] == "gate_init" and "routes" not in ckpt["model_config"] and ckpt["model_config"]["policy"] is None
    assert ckpt["model"].keys() == backbone["model"].keys()
    gate_keys = [k for k in ckpt["model"] if k.startswith(("gate.", "gate_embeds."))]
    assert gate_keys and len(gate_keys) < len(ckpt["model"])
    differ = set()
    for k, v in ckpt["model"].items():
        source = gate if k in gate_keys else backbone
        other = backbone if k in gate_keys else gate
        assert torch.equal(v, source["model"][k]), k
        if not torch.equal(v, other["model"][k]):
            differ.add(k)
    # the premise: the sources differ in the gate's weights, the blocks' weights, BNs and ranges
    assert {"gate.lstm.weight_ih", "gate_embeds.0.conv.weight", "blocks.1.conv1.weight",
            "option_norms.0.8-bit.bn1.running_mean", "blocks.1.conv1.running_max"} <= differ
    assert ckpt["assembled_from"]["gate"] == str(tmp_path / "g.pth") and len(ckpt["assembled_from"]["gate_sha256"]) == 64
    model = build_model(**{k if k != "name" else "name": v for k, v in model_config(ckpt).items()})
    model.load_state_dict(ckpt["model"])  # a whole network, loadable as it is


def test_assembling_refuses_networks_that_do_not_fit(tmp_path, capsys):
    _, backbone = gated(1, "dfs")
    _, shared = gated(2, "gate_init", bn="shared")
    save_checkpoint(backbone, tmp_path / "b.pth")
    save_checkpoint(shared, tmp_path / "g.pth")
    assert assemble.main(["--backbone", str(tmp_path / "b.pth"), "--gate", str(tmp_path / "g.pth"),
                          "--out", str(tmp_path / "o.pth")]) == 2
    assert "differ in BN: per-option against shared" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()


# --- feature 1: gate-only training ----------------------------------------------------------------

def test_gate_only_training_changes_the_gate_and_nothing_else(tmp_path):
    """Stage 3 with --train gate from a per-option-BN stage 2: after 3 steps every backbone parameter
    and buffer (weights, BN statistics, per-option BNs, activation ranges) is bit for bit the start's,
    and the gate has moved."""
    _, start = gated(3, "gate_init")
    save_checkpoint(start, tmp_path / "start.pth")
    with small_synthetic():
        status = engine.main(train_dfs.STAGE, [
            "train", "dfs_resnet20", "--dataset", "synthetic", "--train", "gate", "--resume", str(tmp_path / "start.pth"),
            "--iters", "3", "--eval-every", "3", "--batch-size", "16", "--beta", "1e-3", "--device", "cpu",
            "--budget-loss", "squared", "--save-folder", str(tmp_path / "save")])
    assert status == 0
    after = load_checkpoint(str(tmp_path / "save" / "dfs_resnet20" / "checkpoint_latest.pth.tar"))
    assert after["args"]["train"] == "gate"
    moved = [k for k, v in after["model"].items() if not torch.equal(v, start["model"][k])]
    assert moved and all(k.startswith(("gate.", "gate_embeds.")) for k in moved), moved
    assert any(k.startswith("gate.") for k in moved) and any(k.startswith("gate_embeds.") for k in moved)


def test_gate_only_gives_the_gate_the_gradient_of_a_full_step_in_the_same_mode():
    """Freezing the backbone changes nothing the gate sees: its gradients equal those of the same
    network with every parameter trainable (the backbone in eval mode in both)."""
    model, _ = gated(4, "gate_init")
    full = copy.deepcopy(model)
    model.gate_only = full.gate_only = True
    model.train(), full.train()
    assert model.training and model.gate.training and not model.blocks[1].training
    assert not model.option_norms[0]["8-bit"]["bn1"].training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in continuing.gate_parameters(model):
        p.requires_grad_(True)
    x, y = images(12, seed=9), torch.arange(12) % 10
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    grads = []
    for m in (model, full):
        logits, decisions = m(x)
        loss = torch.nn.functional.cross_entropy(logits, y) + 1e-3 * decisions.sum()
        loss.backward()
        grads.append([p.grad.clone() for p in continuing.gate_parameters(m)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in full.blocks[1].parameters())  # full: all learn
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())  # no buffer moved in the forward


def test_gate_only_refuses_a_network_without_a_gate_to_run(tmp_path, capsys):
    _, start = gated(3, "gate_init")
    save_checkpoint(start, tmp_path / "start.pth")
    with pytest.raises(SystemExit) as e:
        engine.main(train_dfs.STAGE, [
            "train", "dfs_resnet20", "--dataset", "synthetic", "--train", "gate", "--policy", "skip,8,8,8,8,8,8,8",
            "--resume", str(tmp_path / "start.pth"), "--device", "cpu", "--save-folder", str(tmp_path / "save")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--train gate trains the gate" in err[0]


# --- feature 4: the policy-gradient estimator ---------------------------------------------------------

import argparse  # noqa: E402
import os  # noqa: E402
import json  # noqa: E402
import itertools  # noqa: E402

from core import losses  # noqa: E402
from helpers import log_records  # noqa: E402
from models.gate import LSTMGate  # noqa: E402


class TwoOptions(torch.nn.Module):
    """The cost model the loss reads, for options {skip, full} (no layers)."""

    def __init__(self):
        super().__init__()
        self.option_costs = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def computation_percentage(self, decisions):
        return 100 * (decisions * self.option_costs).sum(-1).mean()


@pytest.mark.parametrize("n", [2, 3])
def test_the_policy_gradient_is_unbiased_exactly(n):
    """The estimator as implemented (reinforce_loss with its leave-one-out baseline and the squared
    budget term on the expected cost), averaged over every batch of n trajectories weighted by its
    probability, equals the exact gradient of E[CE] + lambda ((E[cp] - target) / 100)^2: a toy policy
    of 3 blocks x 2 options (a softmax of parameters theta), each of its 8 trajectories with its own
    logits. float64, so equal up to rounding."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(8, 10, generator=g, dtype=torch.float64)  # logits of each trajectory
    target = torch.tensor([3] * n)
    trajectories = list(itertools.product((0, 1), repeat=3))
    model, lam, goal = TwoOptions(), 50.0, 40.0
    loss_fn = losses.budget_loss(argparse.Namespace(gate_estimator="reinforce", budget_loss="squared",
                                                    cost_weight=lam, target_cp=goal))
    probs = torch.softmax(theta, -1)
    expected = torch.zeros_like(theta)
    for batch in itertools.product(range(8), repeat=n):
        choices = torch.tensor([trajectories[t] for t in batch])
        decisions = torch.nn.functional.one_hot(choices, 2).to(torch.float64)
        weight = probs.detach()[torch.arange(3), choices].prod().item()  # over rows and blocks
        loss, _ = loss_fn(table[list(batch)], decisions, target, model, probs.expand(n, -1, -1))
        expected += weight * torch.autograd.grad(loss, theta, retain_graph=True)[0]
    pi = torch.stack([probs[range(3), list(t)].prod() for t in trajectories])
    ce = torch.nn.functional.cross_entropy(table, torch.tensor([3] * 8), reduction="none")
    expected_cp = 100 * (probs * model.option_costs).sum(-1).mean()
    exact = torch.autograd.grad((pi * ce).sum() + lam * ((expected_cp - goal) / 100) ** 2, theta)[0]
    assert torch.allclose(expected, exact, rtol=1e-10, atol=1e-12), (expected, exact)
    assert exact.abs().max() > 1e-3  # the premise: a gradient to match


def test_the_gate_samples_from_its_softmax_in_training_and_takes_the_argmax_in_eval():
    torch.manual_seed(0)
    gate = LSTMGate(4)
    gate.sampling = True
    feat = torch.randn(1, 10).expand(40000, -1)
    state = gate.init_state(40000, feat.device)
    probs, hard, _ = gate(feat, state)
    assert not hard.requires_grad and hard.sum(1).eq(1).all()
    share = hard.mean(0)
    p = probs[0].detach()
    assert ((share - p).abs() <= 4 * (p * (1 - p) / 40000).sqrt() + 1e-6).all(), (share, p)
    assert len(hard.argmax(1).unique()) > 1
    gate.eval()
    _, hard, _ = gate(feat[:3], gate.init_state(3, feat.device))
    assert torch.equal(hard.argmax(1), probs[:3].argmax(1))


def test_reinforce_trains_resumes_exactly_and_evaluates_the_argmax(tmp_path):
    """Stage 3 with --gate-estimator reinforce: 4 iterations straight equal 2, then a resume to 4, bit
    for bit (the samples come from the saved random stream); the gate moves; evaluation's decisions
    are the argmax (the same figures evaluated twice)."""
    _, start = gated(5, "gate_init")
    save_checkpoint(start, tmp_path / "start.pth")
    common = ["train", "dfs_resnet20", "--dataset", "synthetic", "--gate-estimator", "reinforce",
              "--budget-loss", "squared", "--beta", "10", "--minimum", "30", "--batch-size", "16",
              "--device", "cpu", "--eval-every", "2", "--print-freq", "1"]
    with small_synthetic():
        assert engine.main(train_dfs.STAGE, common + ["--resume", str(tmp_path / "start.pth"), "--iters", "4",
                                                      "--save-folder", str(tmp_path / "straight")]) == 0
        assert engine.main(train_dfs.STAGE, common + ["--resume", str(tmp_path / "start.pth"), "--iters", "2",
                                                      "--save-folder", str(tmp_path / "split")]) == 0
        latest = tmp_path / "split" / "dfs_resnet20" / "checkpoint_latest.pth.tar"
        assert engine.main(train_dfs.STAGE, common + ["--resume", str(latest), "--iters", "4"]) == 0
    a = load_checkpoint(str(tmp_path / "straight" / "dfs_resnet20" / "checkpoint_latest.pth.tar"))
    b = load_checkpoint(str(latest))
    assert a["step"] == b["step"] == 4 and a["args"]["gate_estimator"] == "reinforce"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not torch.equal(a["model"]["gate.proj.weight"], start["model"]["gate.proj.weight"])
    records = log_records(tmp_path / "straight" / "dfs_resnet20")
    assert [r["step"] for r in records] == [2, 4]
    assert log_records(tmp_path / "split" / "dfs_resnet20") == records  # evaluations too: argmax, deterministic


# --- feature 3: the gate distilled to a routing ------------------------------------------------------

from core.settings import parse_args  # noqa: E402
from test_round4 import framed  # noqa: E402


def test_the_distillation_loss_is_the_gates_cross_entropy_against_the_routing():
    """On a tiny case worked out by hand: two images, two blocks, the forced routing as decisions."""
    probs = torch.tensor([[[0.5, 0.5], [0.9, 0.1]], [[0.2, 0.8], [0.25, 0.75]]], requires_grad=True)
    decisions = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])  # routing: 0,1 and 1,1
    loss, cp = losses.distill_loss(argparse.Namespace())(None, decisions, None, TwoOptions(), probs)
    want = -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.1)) + torch.log(torch.tensor(0.8))
             + torch.log(torch.tensor(0.75))) / 4
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert cp.item() == pytest.approx(100 * (0 + 0 + 1 + 1) / 4)  # the gate's own argmax: (0, 0) and (1, 1)


def test_a_gate_distilled_to_a_routing_learns_it(tmp_path, monkeypatch):
    """Stage 3 with --train gate and a routing to distil on a small framed set (the same policy for both
    halves, one that changes from block to block, so that what is tested is the mechanism, not whether
    an untrained backbone makes the frame visible to the gate; the study's control B0 tests that on
    trained weights): the backbone is unchanged, the loss falls, and on the test images the gate's own
    decisions are the routing's at every block."""
    import data
    y = torch.arange(96) % 10
    grey = torch.zeros(96, 3, 32, 32, dtype=torch.uint8)
    g = torch.Generator().manual_seed(1)
    grey[:] = (torch.rand(96, 1, 32, 32, generator=g) * 255).to(torch.uint8)
    grey[::2] = data.mark(grey[::2], y[::2])
    arrays = (grey[:64], y[:64], grey[64:], y[64:])
    monkeypatch.setattr(data, "load_arrays", lambda name, d, download=False: arrays)
    _, start = gated(6, "gate_init")
    save_checkpoint(start, tmp_path / "start.pth")
    folder = tmp_path / "save" / "dfs_resnet20"
    policy = ["skip", "full", "full", "skip", "8", "skip", "16", "full"]
    with small_synthetic():
        assert engine.main(train_dfs.STAGE, [
            "train", "dfs_resnet20", "--dataset", "fashion-mnist-marked", "--train", "gate", "--lr", "0.5",
            "--distill-marked", ",".join(policy), "--distill-unmarked", ",".join(policy),
            "--resume", str(tmp_path / "start.pth"), "--iters", "40", "--eval-every", "40", "--print-freq", "10",
            "--batch-size", "32", "--device", "cpu", "--save-folder", str(tmp_path / "save")]) == 0
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert train[-1]["loss"] < 0.2 * train[0]["loss"]
    shares = log_records(folder)[-1]["decision_distribution"]  # [G][O] on the 32 test images
    names = ["skip", "8-bit", "16-bit", "full"]
    assert [max(range(4), key=lambda o: row[o]) for row in shares] == [names.index(p if p in names else f"{p}-bit")
                                                                       for p in policy]
    assert min(row[names.index(p if p in names else f"{p}-bit")] for row, p in zip(shares, policy)) >= 0.9
    after = load_checkpoint(str(folder / "checkpoint_latest.pth.tar"))
    assert all(torch.equal(v, start["model"][k]) for k, v in after["model"].items() if not k.startswith("gate"))


def test_distillation_refuses_what_it_cannot_do():
    for extra, words in ((["--train", "all"], "train the gate alone"),
                         (["--train", "gate", "--dataset", "synthetic"], "route by the frame"),
                         (["--train", "gate", "--gate-estimator", "reinforce"], "train the gate alone")):
        argv = ["train", "dfs_resnet20", "--dataset", "fashion-mnist-marked", "--distill-marked", "skip",
                "--distill-unmarked", "full", "--device", "cpu", *extra]
        with pytest.raises(SystemExit):
            parse_args(train_dfs.STAGE, argv)


# --- feature 5: counterfactual diagnostics ------------------------------------------------------------

from core.evaluation import counterfactuals  # noqa: E402
from models.dfs_resnet import has_mark  # noqa: E402


def test_counterfactuals_equal_an_image_by_image_computation():
    """Against an independent formulation: each image alone, each block forced alone with
    force_option, the gate's own choices elsewhere; and forcing the option a block already chose
    changes nothing for the images that chose it."""
    model, _ = gated(8, "gate_init")
    model.eval()
    x, y = framed(12, torch.arange(12) % 3 == 0)
    result = counterfactuals(model, [(x[:7], y[:7]), (x[7:], y[7:])], marked=True)
    marks = has_mark(x)
    assert result["halves"]["marked"]["images"] == int(marks.sum()) == 4
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    with torch.no_grad():  # per image, in plain Python: the same batches (batch size moves fp32 rounding)
        per_image = {}  # (image, g, o) -> (change of CE, change of top-1 in points)
        for b, (xb, yb) in enumerate(batches):
            logits, decisions = model(xb)
            for g in range(8):
                for o in range(4):
                    force = decisions.argmax(2)
                    force[:, g] = o
                    forced, _ = model(xb, force_option=force)
                    for j in range(len(yb)):
                        i = 7 * b + j
                        ce0 = torch.nn.functional.cross_entropy(logits[j:j + 1], yb[j:j + 1]).item()
                        ce1 = torch.nn.functional.cross_entropy(forced[j:j + 1], yb[j:j + 1]).item()
                        top = 100 * (int(forced[j].argmax() == yb[j]) - int(logits[j].argmax() == yb[j]))
                        per_image[i, g, o] = (ce1 - ce0, top)
        for half, mask in (("marked", marks), ("unmarked", ~marks)):
            images = torch.nonzero(mask).flatten().tolist()
            for g in range(8):
                for o in range(4):
                    got = result["halves"][half]
                    want_ce = sum(per_image[i, g, o][0] for i in images) / len(images)
                    want_top1 = sum(per_image[i, g, o][1] for i in images) / len(images)
                    assert got["delta_ce"][g][o] == pytest.approx(want_ce, abs=1e-6)
                    assert got["delta_top1"][g][o] == pytest.approx(want_top1, abs=1e-9)
        _, decisions = model(x)
        chosen = decisions.argmax(2)
    for g in range(8):
        for o in range(4):
            if (chosen[:, g] == o).all():  # every image chose o here: forcing o is no change
                assert result["halves"]["marked"]["delta_ce"][g][o] == 0.0
    assert any(abs(v) > 1e-3 for row in result["halves"]["unmarked"]["delta_ce"] for v in row)  # not all zero


def test_eval_counterfactual_flag_end_to_end(tmp_path, capsys):
    import eval as eval_cli
    _, ckpt = gated(9, "gate_init")
    save_checkpoint(ckpt, tmp_path / "m.pth")
    with small_synthetic(test=20):
        assert eval_cli.main([str(tmp_path / "m.pth"), "--device", "cpu", "--counterfactual",
                              "--json", str(tmp_path / "r.json")]) == 0
    record = json.loads((tmp_path / "r.json").read_text())["counterfactual"]
    assert record["options"] == ["skip", "8-bit", "16-bit", "full"] and record["halves"]["all"]["images"] == 20
    assert len(record["halves"]["all"]["delta_ce"]) == 8 and "counterfactual, all (20 images)" in capsys.readouterr().out


# --- feature 6: equal-cost comparisons ----------------------------------------------------------------

def test_the_counterpart_is_searched_at_the_nearest_static_cost_and_labelled_by_the_gap():
    assert round5_analysis.grid_cost(2.30) == pytest.approx(2.34375)  # three 8-bit blocks
    assert round5_analysis.grid_cost(1.9) == pytest.approx(1.5625) and round5_analysis.grid_cost(2.0) == pytest.approx(2.34375)
    assert round5_analysis.grid_cost(0.3) == 0.0
    assert round5_analysis.comparison_label(2.25, 2.34375) == "equal-cost"  # 0.094 apart
    assert round5_analysis.comparison_label(2.227, 2.34375) == "descriptive"  # round 4's squared arm: 0.117 apart
    assert round5_analysis.comparison_label(2.44375, 2.34375) == "equal-cost"  # 0.1 exactly


def test_at_the_oracles_cost_round_4s_static_network_is_reused(tmp_path):
    study = round5.Round5(str(tmp_path / "out"), str(tmp_path / "runs"))
    records = {"arm": {"val": {"computation_percentage": 2.29}}}
    r = study.equal_cost_static("static_of_arm", "arm", records, seed=1)
    assert r["same_as"] == "round 4's static_3000_s1" and r["target"] == pytest.approx(2.34375)
    assert r["test"]["computation_percentage"] == pytest.approx(2.34375)


def test_an_unfinished_run_is_parked_and_continues_from_a_fresh_checkout(tmp_path):
    """park copies an unfinished run's state out of RUNS (which a session's end loses) into OUT; in a
    fresh RUNS, unpark puts it back where train_final resumes from, byte for byte; finished runs and
    runs that never started are left alone."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    study = round5.Round5(str(out), str(runs))
    folder = runs / "b1_argmax_s0" / "dfs_resnet20"
    folder.mkdir(parents=True)
    (folder / "checkpoint_latest.pth.tar").write_bytes(b"state of iteration 1250")
    (folder / "log.jsonl").write_text('{"step": 1250}\n')
    (runs / "a_oracle_shared_300_s0" / "dfs_resnet20").mkdir(parents=True)
    (runs / "a_oracle_shared_300_s0" / "dfs_resnet20" / "checkpoint_latest.pth.tar").write_bytes(b"done")
    study.save("a_oracle_shared_300_s0", {"test": {}})
    assert study.park() == ["b1_argmax_s0"]
    assert (out / "unfinished" / "b1_argmax_s0" / "checkpoint_latest.pth").read_bytes() == b"state of iteration 1250"
    fresh = round5.Round5(str(out), str(tmp_path / "fresh"))
    fresh.unpark("b1_argmax_s0")
    back = tmp_path / "fresh" / "b1_argmax_s0" / "dfs_resnet20"
    assert (back / "checkpoint_latest.pth.tar").read_bytes() == b"state of iteration 1250"
    assert (back / "log.jsonl").read_text() == '{"step": 1250}\n'
    (back / "checkpoint_latest.pth.tar").write_bytes(b"further")
    fresh.unpark("b1_argmax_s0")  # a run folder of its own wins
    assert (back / "checkpoint_latest.pth.tar").read_bytes() == b"further"


def test_round_5_records_name_files_of_the_repository_and_results_md_is_generated_from_them(tmp_path):
    """Every checkpoint a record names exists in the repository, every record carries its provenance
    (the CPU included), and results.md is what the analysis writes from the records."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = round5_analysis.records("results/fashion-mnist-round5")
    assert runs, "no records yet"
    for name, r in runs.items():
        path = r["checkpoint"]
        assert not os.path.isabs(path) and os.path.isfile(os.path.join(root, path)), (name, path)
        assert {"code_commit", "cpu", "cpu_capability", "vnni", "amx"} <= set(r["provenance"]), name
    round5_analysis.write(runs, str(tmp_path))
    with open(os.path.join(root, "results", "fashion-mnist-round5", "results.md")) as f:
        assert (tmp_path / "results.md").read_text() == f.read(), "results.md is stale: python study/round5.py --analyse-only"


def test_tier_c_runs_argmax_and_each_estimator_that_passed_tier_b_from_b0(tmp_path):
    passed = {"routing": {"halves": {"marked": {"computation_percentage": 0.3, "acc": 100.0},
                                     "unmarked": {"computation_percentage": 4.6, "acc": 91.0}},
                          "mark_information_bits": [0, 0, 0.7, 0.7, 0.7, 0.9, 0.9, 0.8]}}
    failed = {"routing": {"halves": {"marked": {"computation_percentage": 3.0, "acc": 99.0},
                                     "unmarked": {"computation_percentage": 1.2, "acc": 32.0}},
                          "mark_information_bits": [0] * 8}}
    records = {"b1_argmax_s0": {"test": failed}, "b2_gumbel_s0": {"test": passed}, "b3_reinforce_s0": {"test": failed}}
    tier_c = [(name, needs) for tier, name, _, _, needs in round5.plan(records) if tier == "C"]
    assert tier_c == [("c_argmax_s0", ("b0_distill_s0",)), ("c_gumbel_s0", ("b0_distill_s0",))]
    assert [name for tier, name, *_ in round5.plan() if tier == "C"] == ["c_argmax_s0"]  # before tier B
    assert "--train" not in round5.C_ARM and round5.C_ARM[round5.C_ARM.index("--beta") + 1] == "1000"
    # the start: B0's final state as a stage-2 checkpoint, every tensor B0's
    _, b0 = gated(10, "dfs")
    save_checkpoint(b0, tmp_path / "b0.pth")
    study = round5.Round5(str(tmp_path / "out"), str(tmp_path / "runs"))
    start = load_checkpoint(os.path.join(round5.ROOT, study.start_c({"b0_distill_s0": {"checkpoint": str(tmp_path / "b0.pth")}})))
    assert start["stage"] == "gate_init" and all(torch.equal(v, b0["model"][k]) for k, v in start["model"].items())


def test_tier_c_calls_a_routing_persisting_decaying_or_collapsed():
    def record(marked, unmarked, bits):
        return {"routing": {"halves": {"marked": {"computation_percentage": marked, "acc": 99.0},
                                       "unmarked": {"computation_percentage": unmarked, "acc": 90.0}},
                            "mark_information_bits": bits}}
    assert round5_analysis.stability(record(0.0, 4.6, [0, 0] + [0.9] * 6)) == "persists"
    assert round5_analysis.stability(record(1.0, 3.5, [0, 0] + [0.9] * 6)) == "decays"  # gap 2.5
    assert round5_analysis.stability(record(0.5, 4.0, [0, 0, 0.9, 0.9, 0.9, 0.1, 0, 0])) == "decays"  # 3 blocks
    assert round5_analysis.stability(record(2.0, 2.9, [0, 0] + [0.9] * 6)) == "collapses"  # gap 0.9
