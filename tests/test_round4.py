"""Round 4's features (issue 30): a fixed per-input routing, the budget terms, the Gumbel gate estimator,
the routing diagnostics and the negative-control data set. Each against values worked out by hand or an
independent formulation; the faithful defaults unchanged."""
import argparse
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import data
import eval as eval_cli
import train_dfs
from core import engine, losses
from core.evaluation import evaluate, mutual_information_bits, routing_diagnostics
from core.settings import gumbel_tau, parse_args
from helpers import DEVICE, images, log_records, randomize_bn, small_synthetic, spread_gate
from models import build_model
from models.cost import cost_penalty
from models.dfs_resnet import has_mark

PAPER = ("skip", 8, 16, "full")
MARKED = ["skip"] * 8
UNMARKED = ["skip", "skip", "8", "8", "8", "8", "8", "8"]
POLICY = ["skip", "8", "16", "full", "8", "8", "skip", "full"]


def framed(n, marked, seed=3):
    """n grey images (normalised as fashion-mnist) of which those where `marked` carry a coloured frame."""
    g = torch.Generator().manual_seed(seed)
    grey = (torch.rand(n, 1, 32, 32, generator=g) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    labels = torch.randint(0, 10, (n,), generator=g)
    grey[marked] = data.mark(grey[marked], labels[marked])
    mean, std = data.MEAN_STD["fashion-mnist-marked"]
    x = (grey.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x.to(DEVICE), labels.to(DEVICE)


MASK = torch.tensor([True, False, False, True, True, False])


# --- the fixed routing (the oracle arm) --------------------------------------------------------------

def test_has_mark_finds_the_frame_after_any_crop_and_flip():
    x, _ = framed(6, MASK)
    assert has_mark(x).cpu().tolist() == MASK.tolist()
    # the training augmentation: the largest shifts keep part of the frame in view; grey stays grey
    for dx, dy in ((0, 0), (8, 8), (0, 8), (8, 0)):
        for flip in (False, True):
            shifted = data.Batches.crop_flip(x, torch.full((6,), dx), torch.full((6,), dy), torch.full((6,), flip))
            assert has_mark(shifted).cpu().tolist() == MASK.tolist()


@pytest.mark.parametrize("training", [False, True])
def test_each_image_gets_its_halfs_policy(training):
    torch.manual_seed(0)
    model = build_model("dfs_resnet20", options=PAPER, routes={"marked": MARKED, "unmarked": UNMARKED}).to(DEVICE)
    model.train(training)
    x, _ = framed(6, MASK)
    _, decisions = model(x)
    names = [[model.option_names[k] for k in row] for row in decisions.argmax(2).tolist()]
    want = {True: ["skip"] * 8, False: ["skip", "skip"] + ["8-bit"] * 6}
    assert names == [want[m] for m in MASK.tolist()]
    # the computation percentage exactly: 0 for a marked image, 6/8 * (8/32)^2 = 4.6875 % for the others
    per_image = 100 * (decisions * model.option_costs).sum(2).mean(1)
    assert per_image.tolist() == [0.0 if m else 4.6875 for m in MASK.tolist()]


def test_the_routing_logits_are_each_halfs_static_network():
    """Each image's logits equal its half's static-policy network's, in eval (grouped execution)."""
    torch.manual_seed(0)
    routed = build_model("dfs_resnet20", options=PAPER, routes={"marked": MARKED, "unmarked": POLICY}).to(DEVICE)
    randomize_bn(routed)
    x, _ = framed(6, MASK)
    logits, _ = routed.eval()(x)
    for policy, rows in ((MARKED, MASK), (POLICY, ~MASK)):
        static = build_model("dfs_resnet20", options=PAPER, policy=policy).to(DEVICE)
        static.load_state_dict(routed.state_dict())
        assert torch.allclose(logits[rows.to(DEVICE)], static.eval()(x[rows.to(DEVICE)])[0], atol=1e-5)


def training_step(model, x, y):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    logits, decisions = model(x)
    loss = F.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss, grads, {k: v.clone() for k, v in model.state_dict().items()}


def test_the_same_policy_for_both_halves_is_the_static_network():
    """Loss, every gradient and every buffer after a training step, and then the eval logits: bit for bit."""
    torch.manual_seed(0)
    static = build_model("dfs_resnet20", options=PAPER, policy=POLICY).to(DEVICE)
    randomize_bn(static)
    routed = build_model("dfs_resnet20", options=PAPER, routes={"marked": POLICY, "unmarked": POLICY}).to(DEVICE)
    routed.load_state_dict(static.state_dict())
    x, y = framed(6, MASK)
    a, b = training_step(static, x, y), training_step(routed, x, y)
    assert torch.equal(a[0], b[0])
    for ga, gb in zip(a[1], b[1]):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    assert torch.equal(static.eval()(x)[0], routed.eval()(x)[0])
    # the parameters neither network uses: the gate's and the skipped blocks' (same set)
    def unused(m):
        ids = {id(p) for p in m.unused_parameters()}
        return {n for n, p in m.named_parameters() if id(p) in ids}
    assert unused(static) == unused(routed) and "gate.proj.weight" in unused(static)


def test_routing_in_training_updates_only_the_routed_images_statistics():
    """A block run at 8 bits by the unmarked images only: its BN's running mean moves by the statistics
    of those images alone (nn.BatchNorm2d on them), and its conv1's range by theirs."""
    torch.manual_seed(0)
    model = build_model("dfs_resnet20", options=PAPER, routes={"marked": MARKED, "unmarked": UNMARKED}).to(DEVICE)
    reference = copy.deepcopy(model)
    x, _ = framed(6, MASK)
    model.train()(x)
    keep = ~MASK.to(DEVICE)
    with torch.no_grad():  # the same images through the same blocks by hand: skip, skip, then block 4 at 8 bits
        h = reference.blocks[0](reference.stem(x))[keep]  # every image runs the stem and block 1
        h = reference.blocks[2].shortcut(reference.blocks[1].shortcut(h))
        block = reference.blocks[3].train()
        block(h, 8)
    assert torch.equal(model.blocks[3].bn1.running_mean, block.bn1.running_mean)
    assert torch.equal(model.blocks[3].conv1.running_max, block.conv1.running_max)


def test_routing_is_refused_where_it_cannot_apply(tmp_path, capsys):
    base = ["train", "dfs_resnet20", "--route-marked", "skip", "--route-unmarked", "8"]
    with pytest.raises(SystemExit):
        parse_args(train_dfs.STAGE, base + ["--dataset", "fashion-mnist"])
    assert "route by the frame" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(train_dfs.STAGE, base[:4] + ["--dataset", "fashion-mnist-marked"])
    assert "go together" in capsys.readouterr().err
    with pytest.raises(ValueError, match="either a static policy or a per-input routing"):
        build_model("dfs_resnet20", options=PAPER, policy=POLICY, routes={"marked": MARKED, "unmarked": MARKED})
    with pytest.raises(ValueError, match="one option per gated block"):
        build_model("dfs_resnet20", options=PAPER, routes={"marked": ["skip", "8"], "unmarked": MARKED})


# --- the budget terms --------------------------------------------------------------------------------

class Costed(torch.nn.Module):
    """The cost model of a network with the paper's options (no layers): what the loss reads."""

    def __init__(self):
        super().__init__()
        self.option_costs = torch.tensor([0.0, 1 / 16, 1 / 4, 1.0])

    def computation_percentage(self, decisions):
        return 100 * (decisions * self.option_costs).sum(-1).mean()


def loss_and_grad(kind, choices, target, beta, band=0.0, cap=0.0, ce_scale=1.0):
    """The stage-3 loss of a batch whose decisions are `choices` ([B, G] option indices), and its
    gradient with respect to the decisions. The logits are fixed: cross entropy log(10) * ce_scale."""
    args = argparse.Namespace(budget_loss=kind, target_cp=target, cost_weight=beta, budget_band=band, budget_cap=cap)
    decisions = F.one_hot(torch.tensor(choices), 4).float().requires_grad_()
    logits = torch.zeros(len(choices), 10) if ce_scale == 1.0 else torch.tensor([[math.log(ce_scale)] + [0.0] * 9] * len(choices))
    y = torch.zeros(len(choices), dtype=torch.long) if ce_scale == 1.0 else torch.ones(len(choices), dtype=torch.long)
    loss, cp = losses.budget_loss(args)(logits, decisions, y, Costed())
    loss.backward()
    return loss, cp, decisions.grad, F.cross_entropy(logits, y)


def test_signed_is_the_papers_term_bit_for_bit():
    choices = [[3, 1], [0, 2]]
    loss, cp, grad, ce = loss_and_grad("signed", choices, 10.0, 0.5)
    penalty = cost_penalty(F.one_hot(torch.tensor(choices), 4).float(), Costed().option_costs)
    assert cp.item() == 100 * (1 + 1 / 16 + 0 + 1 / 4) / 4
    assert torch.equal(loss, ce + 0.5 * torch.tensor(1.0) * penalty)  # cp 32.8 > 10: s = +1
    assert torch.equal(grad, 0.5 * Costed().option_costs.expand(2, 2, 4))


@pytest.mark.parametrize("choices,sign", [([[3, 3]], 1), ([[0, 1]], -1)])
def test_squared_gradient_by_hand(choices, sign):
    """beta (cp/100 - t/100)^2: d/d decision_{i,g,k} = 2 beta (cp - t)/100 * cost_k / (100 B G) * 100."""
    target, beta = 20.0, 3.0
    loss, cp, grad, ce = loss_and_grad("squared", choices, target, beta)
    gap = (cp.item() - target) / 100
    assert math.copysign(1, gap) == sign
    assert loss.item() == pytest.approx(ce.item() + beta * gap ** 2, rel=1e-6)
    want = 2 * beta * gap * Costed().option_costs / (1 * 2)  # one image, two gated blocks
    assert torch.allclose(grad, want.expand(1, 2, 4), rtol=1e-5)


@pytest.mark.parametrize("choices,target,weight", [
    ([[1, 1]], 10.0, -1.0),   # cp 6.25 < 10 - 2: -1
    ([[1, 1]], 7.0, -0.1),    # 5 <= 6.25 < 7: inside the band, below the target
    ([[1, 1]], 6.0, 0.1),     # 6 <= 6.25 < 8: inside the band, at or above the target
    ([[1, 1]], 4.0, 1.0),     # 6.25 >= 4 + 2: +1
])
def test_deadband_sign_and_size_by_hand(choices, target, weight):
    beta = 0.01
    loss, cp, grad, ce = loss_and_grad("deadband", choices, target, beta, band=2.0, cap=0.0)
    assert cp.item() == 6.25
    assert loss.item() == pytest.approx(ce.item() + weight * beta * 2 / 16, rel=1e-6)
    assert torch.allclose(grad, (weight * beta * Costed().option_costs).expand(1, 2, 4))


def test_deadband_caps_the_term_at_a_fraction_of_cross_entropy():
    """beta C = 10 * 2/16 = 1.25 > 0.1 * CE: the term becomes exactly 0.1 CE, its gradient scaled alike."""
    loss, cp, grad, ce = loss_and_grad("deadband", [[1, 1]], 1.0, 10.0, band=0.5, cap=0.1)
    factor = 0.1 * ce.item() / 1.25
    assert loss.item() == pytest.approx(ce.item() * 1.1, rel=1e-6)
    assert torch.allclose(grad, (10.0 * factor * Costed().option_costs).expand(1, 2, 4), rtol=1e-5)
    # below the cap nothing changes
    small = loss_and_grad("deadband", [[1, 1]], 1.0, 1e-3, band=0.5, cap=0.1)
    assert small[0].item() == pytest.approx(small[3].item() + 1e-3 * 2 / 16, rel=1e-6)


# --- the Gumbel estimator ----------------------------------------------------------------------------

def gate_outputs(model, seed, training=True):
    model.train(training)
    torch.manual_seed(seed)
    feat, state = torch.randn(64, 10), model.gate.init_state(64, "cpu")
    return model.gate(feat, state)


def test_gumbel_samples_reproduce_and_follow_the_softmax():
    model = build_model("dfs_resnet20", options=PAPER)
    model.gate.gumbel_tau = 1.0
    a, b = gate_outputs(model, 4), gate_outputs(model, 4)
    assert torch.equal(a[1], b[1])
    argmax = gate_outputs(copy.deepcopy(model).requires_grad_(False), 4, training=False)[1]
    assert not torch.equal(a[1].detach(), argmax)  # it samples
    # the sample is the Gumbel-max of the logits, whatever the temperature (the soft sample's gradient
    # follows tau): the same seed gives the same one-hot at tau 0.01 and 100
    for tau in (0.01, 100.0):
        model.gate.gumbel_tau = tau
        assert torch.equal(gate_outputs(model, 4)[1].detach(), a[1].detach())
    # as tau -> 0 the soft sample that carries the gradient tends to the hard sample
    model.gate.gumbel_tau = 1e-3
    soft = gate_outputs(model, 4)[0]
    assert torch.allclose(soft, a[1].detach(), atol=1e-4)
    # the samples follow the gate's softmax: 20,000 draws of one row
    model.gate.gumbel_tau = 1.0
    torch.manual_seed(9)
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    with torch.no_grad():  # every row's logits are the bias
        model.gate.proj.weight.zero_()
        model.gate.proj.bias.copy_(logits[0])
    _, hard, _ = model.gate(torch.zeros(20000, 10), model.gate.init_state(20000, "cpu"))
    share = hard.detach().mean(0)
    assert torch.allclose(share, F.softmax(logits[0], 0), atol=0.015)


def test_gumbel_never_samples_in_evaluation():
    model = build_model("dfs_resnet20", options=PAPER)
    spread_gate(model)
    model.eval()
    x = images(8)
    reference = model(x)[1]
    model.gate.gumbel_tau = 1.0
    for seed in range(3):
        torch.manual_seed(seed)
        assert torch.equal(model(x)[1], reference)


def test_gumbel_sparse_training_equals_the_mixed_reference():
    """Loss, every gradient and every buffer: the sparse backward and the mixed formulation, same samples."""
    torch.manual_seed(0)
    model = build_model("dfs_resnet20", options=PAPER, bn="per-option").to(DEVICE)
    spread_gate(model)
    randomize_bn(model)
    x, y = images(8), torch.arange(8, device=DEVICE) % 10
    results = []
    for execution in ("dynamic", "mixed"):
        m = copy.deepcopy(model).train()
        m.gate.gumbel_tau = 0.7
        torch.manual_seed(11)
        logits, decisions = m(x, execution=execution)
        loss = F.cross_entropy(logits, y) + 1e-2 * cost_penalty(decisions, m.option_costs)
        grads = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
        results.append((loss, decisions.argmax(2), grads, m.state_dict()))
    (la, da, ga, sa), (lb, db, gb, sb) = results
    assert torch.equal(da, db) and len(set(da.flatten().tolist())) > 1
    assert torch.equal(la, lb)
    for a, b in zip(ga, gb):
        assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b)) \
            or (a is None and torch.count_nonzero(b) == 0) or (b is None and torch.count_nonzero(a) == 0)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_gumbel_temperature_anneals_exponentially():
    args = argparse.Namespace(gumbel_tau="5:0.5", iters=100)
    assert gumbel_tau(args, 0) == 5.0
    assert gumbel_tau(args, 50) == pytest.approx(5 * 0.1 ** 0.5)
    assert gumbel_tau(args, 100) == pytest.approx(0.5)
    with pytest.raises(SystemExit):
        parse_args(train_dfs.STAGE, ["train", "dfs_resnet20", "--gumbel-tau", "5"])


# --- the routing diagnostics -------------------------------------------------------------------------

def test_routing_diagnostics_by_hand():
    """Four images, two blocks, options {skip, 8, 16, full}.

    block 1: (skip, skip, 8, 8) against marks (1, 1, 0, 0): the decision tells the mark: 1 bit.
    block 2: (full, skip, full, skip): independent of the mark: 0 bit.
    """
    choices = torch.tensor([[0, 3], [0, 0], [1, 3], [1, 0]])
    marks = torch.tensor([True, True, False, False])
    correct = torch.tensor([True, True, True, False])
    costs = torch.tensor([0.0, 1 / 16, 1 / 4, 1.0])
    out = routing_diagnostics(choices, costs, correct, marks)
    assert out["distinct_decision_vectors"] == 4
    assert out["majority_share"] == [0.5, 0.5]
    assert out["mark_information_bits"] == pytest.approx([1.0, 0.0])
    assert out["halves"]["marked"] == {"images": 2, "computation_percentage": 100 * (0 + 1) / 2 / 2, "acc": 100.0}
    assert out["halves"]["unmarked"] == {"images": 2, "computation_percentage": 100 * ((1 / 16 + 1) + 1 / 16) / 2 / 2,
                                         "acc": 50.0}
    # one image in four marked: I = H(mark) - H(mark | decision), 0.811 bit when the decision is the mark
    assert mutual_information_bits(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 1, 1])) == pytest.approx(
        -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))
    assert routing_diagnostics(choices, costs)["distinct_decision_vectors"] == 4


def test_evaluate_reports_the_halves_of_a_routed_network():
    torch.manual_seed(0)
    model = build_model("dfs_resnet20", options=PAPER, routes={"marked": MARKED, "unmarked": UNMARKED}).to(DEVICE)
    x, y = framed(6, MASK)
    stats = evaluate(model, [(x[:4], y[:4]), (x[4:], y[4:])], marked=True)
    halves = stats["routing"]["halves"]
    assert (halves["marked"]["images"], halves["unmarked"]["images"]) == (3, 3)
    assert halves["marked"]["computation_percentage"] == 0.0
    assert halves["unmarked"]["computation_percentage"] == 4.6875
    assert stats["computation_percentage"] == pytest.approx(4.6875 / 2)
    assert stats["routing"]["mark_information_bits"] == pytest.approx([0, 0] + [1.0] * 6)
    assert stats["routing"]["distinct_decision_vectors"] == 2


# --- the negative control ----------------------------------------------------------------------------

def test_marked_random_frames_the_same_half_with_label_free_colours(monkeypatch):
    """Same marked indices as fashion-mnist-marked, frames in random colours drawn without the labels."""
    n = 2000
    g = torch.Generator().manual_seed(0)
    grey = (torch.rand(n, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(n) % 10
    pad = lambda x: F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)  # noqa: E731
    monkeypatch.setattr(data, "_load_fashion", lambda d, dl: (pad(grey), labels.clone(), pad(grey[:400]), labels[:400].clone()))
    plain = data.load_arrays("fashion-mnist", "unused")
    marked = data.load_arrays("fashion-mnist-marked", "unused")
    rand = data.load_arrays("fashion-mnist-marked-random", "unused")
    again = data.load_arrays("fashion-mnist-marked-random", "unused")
    for split, (i, j) in (("train", (0, 1)), ("test", (2, 3))):
        mask = data.marked_mask(len(plain[j]), split)
        framed_rand = (rand[i] != plain[i]).flatten(1).any(1)
        assert torch.equal(framed_rand, (marked[i] != plain[i]).flatten(1).any(1))
        assert torch.equal(framed_rand, mask)
        assert torch.equal(rand[i], again[i])  # seeded
        colour = rand[i][mask][:, :, 0, 0]  # the frame's corner pixel
        index = (colour[:, None, :] == data.MARK_COLORS[None].to(colour.dtype)).all(2).float().argmax(1)
        assert torch.equal(index, data.random_colors(int(mask.sum()), split))
    colour = rand[0][data.marked_mask(n, "train")][:, :, 0, 0]
    index = (colour[:, None, :] == data.MARK_COLORS[None]).all(2).float().argmax(1)
    y = labels[data.marked_mask(n, "train")]
    agree = (index == y).float().mean().item()
    assert 0.05 < agree < 0.15  # chance is 0.1; fashion-mnist-marked's frames agree with the label always
    counts = torch.bincount(index, minlength=10)
    assert counts.min() > 60


# --- end to end: the stage script and eval.py --------------------------------------------------------

def test_a_routed_run_and_its_evaluation_end_to_end(tmp_path, monkeypatch, capsys):
    """Stage 3 with a routing on a small framed set: the run trains, records halves in log.jsonl and
    splits the training loss; eval.py rebuilds the routing from the checkpoint."""
    x, y = framed(96, torch.arange(96) % 2 == 0)
    grey = torch.zeros(96, 3, 32, 32, dtype=torch.uint8)
    g = torch.Generator().manual_seed(1)
    grey[:] = (torch.rand(96, 1, 32, 32, generator=g) * 255).to(torch.uint8)
    grey[::2] = data.mark(grey[::2], y[::2].cpu())
    arrays = (grey[:64], y[:64].cpu(), grey[64:], y[64:].cpu())
    monkeypatch.setattr(data, "load_arrays", lambda name, d, download=False: arrays)
    save = tmp_path / "save"
    with small_synthetic():
        rc = train_dfs.main.__wrapped__ if hasattr(train_dfs.main, "__wrapped__") else None  # noqa: F841
        status = engine.main(train_dfs.STAGE, [
            "train", "dfs_resnet20", "--dataset", "fashion-mnist-marked", "--options", "paper", "--beta", "0",
            "--route-marked", "skip", "--route-unmarked", ",".join(UNMARKED), "--iters", "4", "--print-freq", "2",
            "--eval-every", "4", "--batch-size", "16", "--device", "cpu", "--save-folder", str(save)])
        assert status == 0
        out = capsys.readouterr().out
        assert "(ce " in out and "budget +0.0000)" in out
        record = log_records(save / "dfs_resnet20")[-1]
        assert record["routing"]["halves"]["marked"]["computation_percentage"] == 0.0
        assert record["routing"]["halves"]["unmarked"]["computation_percentage"] == 4.6875
        json_path = tmp_path / "e.json"
        assert eval_cli.main([str(save / "dfs_resnet20" / "checkpoint_latest.pth.tar"), "--device", "cpu",
                              "--json", str(json_path)]) == 0
    import json
    result = json.loads(json_path.read_text())
    assert result["routes"] == {"marked": ["skip"] * 8, "unmarked": ["skip", "skip"] + ["8-bit"] * 6}
    assert result["routing"]["halves"]["unmarked"]["computation_percentage"] == 4.6875
    assert result["computation_percentage"] == pytest.approx(4.6875 / 2)


# ----------------------------------------------------------------------------- the study's rules (PLAN.md)

def t_p_two_df(diffs):
    """Two-sided one-sample t-test p for 3 values, from the closed form of Student's t with 2 df:
    CDF(t) = 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - |t| / sqrt(2 + t^2)."""
    n, mean = len(diffs), sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    t = mean / (sd / math.sqrt(n))
    return 1 - abs(t) / math.sqrt(2 + t * t)


def test_the_certificate_rule_is_holm_over_the_two_lengths_and_every_seed_positive():
    from study.round4_analysis import certificate
    strong, weak = [1.0, 1.1, 1.2], [0.5, -0.1, 0.2]
    out = certificate({300: strong, 3000: weak})
    p1, p2 = t_p_two_df(strong), t_p_two_df(weak)
    assert p1 < p2 and out[300][1] == pytest.approx(p1, rel=1e-6) and out[3000][1] == pytest.approx(p2, rel=1e-6)
    assert out[300][2] == pytest.approx(2 * p1, rel=1e-6) and out[3000][2] == pytest.approx(max(2 * p1, p2), rel=1e-6)
    assert 2 * p1 < 0.05 and (out[300][3], out[3000][3]) == ("holds", "fails")
    # as strong a t, but one seed negative: the rule needs every seed positive
    assert certificate({300: [-0.1, 3.0, 3.1], 3000: strong})[300][3] == "fails"
    assert certificate({300: strong[:2], 3000: strong})[300][3] == "2 of 3 seeds: not complete"


def pilot_records(cps):
    from study import round4
    return {round4.pilot_name(term, w): {"weight": w, "term": term, "val": {"computation_percentage": cp}}
            for (term, w), cp in cps.items()}


def test_the_weight_rule_takes_the_smallest_binding_weight_else_the_largest():
    from study import round4
    t = float(round4.TARGET)
    records = pilot_records({("signed", "0.001"): 10.0, ("signed", "0.01"): 1.1 * t, ("signed", "0.1"): 1.0,
                             ("squared", "10"): 9.0, ("squared", "100"): 8.0, ("squared", "1000"): 1.1 * t + 0.01})
    assert round4.select_weight(records, "signed") == "pilot_signed_w0.01_s0"  # 1.1 x target binds; 0.1 too
    assert round4.select_weight(records, "squared") == "pilot_squared_w1000_s0"  # none binds: the largest


def test_tier_c_takes_the_widest_gap_else_squared():
    from study import round4

    def arm(marked, unmarked, acc):
        return {"val": {"acc": acc, "routing": {"halves": {"marked": {"computation_percentage": marked},
                                                           "unmarked": {"computation_percentage": unmarked}}}}}
    records = {"b_signed_s0": arm(1.0, 3.0, 80.0), "b_squared_s0": arm(2.0, 2.5, 90.0),
               "b_deadband_s0": arm(0.5, 2.5, 85.0)}
    assert round4.select_gumbel_arm(records) == "b_deadband_s0"  # gaps 2.0, 0.5, 2.0: the tie goes to top-1
    records["b_deadband_s0"] = arm(1.0, 1.9, 99.0)
    assert round4.select_gumbel_arm(records) == "b_signed_s0"
    records["b_signed_s0"] = arm(1.0, 1.9, 99.0)
    assert round4.select_gumbel_arm(records) == "b_squared_s0"  # no gap reaches 1 point


def test_the_pass_criterion_needs_the_gap_the_information_and_the_static_top1():
    from study.round4_analysis import verdict
    from study.significance import pack_bits

    def test_record(correct, marked=0.0, unmarked=4.0, bits=(0.9,) * 4 + (0.0,) * 4):
        return {"accuracy": 100 * sum(correct) / len(correct), "num_samples": len(correct),
                "correct_bits": pack_bits(torch.tensor(correct)),
                "routing": {"halves": {"marked": {"computation_percentage": marked},
                                       "unmarked": {"computation_percentage": unmarked}},
                            "mark_information_bits": list(bits)}}
    static = {"test": test_record([True, True, False, False])}
    gap, blocks, diff, _, passes = verdict({"test": test_record([True, True, True, False])}, static)
    assert (gap, blocks, diff, passes) == (4.0, 4, 25.0, True)
    assert verdict({"test": test_record([True, True, False, False], unmarked=2.9)}, static)[4] is False  # gap 2.9
    assert verdict({"test": test_record([True, True, False, False], bits=(0.9,) * 3 + (0.49,) * 5)}, static)[4] is False
    assert verdict({"test": test_record([True, False, False, False])}, static)[4] is False  # below static
    assert verdict({"test": test_record([True, True, False, False])}, None)[4] is None  # no static yet


def test_tiers_b_to_e_do_not_run_when_the_certificate_fails_at_both_lengths(tmp_path, monkeypatch, capsys):
    """Tier A complete with the oracle no better than static (its records are the statics' own): the
    plan's decision rule stops the study before any tier-B run."""
    from study import round4, round4_analysis
    r3 = round4_analysis.round3_runs()
    study = round4.Round4(str(tmp_path / "out"), str(tmp_path / "runs"))
    for s in round4.SEEDS:
        static = r3[f"static_of_dfs_marked_cp3.0_s{s}"]
        for name in (f"oracle_300_s{s}", f"oracle_3000_s{s}", f"static_3000_s{s}"):
            study.save(name, dict(static, name=name))
    monkeypatch.setattr(round4.Round4, "run", lambda *a: pytest.fail("a run started after a failed certificate"))
    study.go()
    assert "certificate fails at both lengths" in capsys.readouterr().out
    _, verdicts = round4_analysis.tier_a(study.records(), r3)
    assert [v[3] for v in verdicts.values()] == ["fails", "fails"]


def test_every_run_of_the_plan_comes_after_the_runs_it_needs():
    from study import round4
    seen = set()
    for tier, name, kind, fields, needs in round4.plan():
        assert set(needs) <= seen, name
        seen.add(name)
    assert len(seen) == len(round4.plan())


def test_passing_arms_get_seeds_1_2_their_statics_and_the_negative_control():
    """Before seed 0 has decided, the plan holds no seed-1/2 or tier-D run; then exactly the passing
    arm's, each after what it needs."""
    from study import round4
    from study.round4_analysis import ARMS
    from study.significance import pack_bits

    def record(correct, gap):
        return {"test": {"accuracy": 50.0, "num_samples": 2, "correct_bits": pack_bits(torch.tensor(correct)),
                         "routing": {"halves": {"marked": {"computation_percentage": 1.0},
                                                "unmarked": {"computation_percentage": 1.0 + gap}},
                                     "mark_information_bits": [1.0] * 8}}}
    records = {a: record([True, False], 0.5) for a in ARMS}
    records["b_squared_s0"] = record([True, True], 3.5)  # the one that passes: gap 3.5, 8 blocks, above static
    assert [r[1] for r in round4.plan(records)] == [r[1] for r in round4.plan()]  # no static has run yet
    records.update({f"static_of_{a}": record([True, False], 0.0) for a in ARMS})
    extra = [r for r in round4.plan(records) if r[0] in ("S", "D")]
    assert [r[1] for r in extra] == ["b_squared_s1", "static_of_b_squared_s1", "b_squared_s2", "static_of_b_squared_s2",
                                     "backbone_random", "gate_po_random_s0", "d_b_squared_s0"]
    assert [r[3].get("seed") for r in extra[:4]] == [1, 1, 2, 2]
    seen = set(records)
    for tier, name, kind, fields, needs in round4.plan(records):
        assert set(needs) <= seen | {n for _, n, *_ in round4.plan(records)[:[r[1] for r in round4.plan(records)].index(name)]}, name
        seen.add(name)


def test_the_seed_table_and_the_negative_control_come_from_the_records():
    from study.round4_analysis import negative_control, seeds
    from study.significance import pack_bits

    def record(correct, gap=4.0, **extra):
        return {"test": {"accuracy": 100 * sum(correct) / len(correct), "num_samples": len(correct),
                         "correct_bits": pack_bits(torch.tensor(correct)),
                         "routing": {"halves": {"marked": {"computation_percentage": 0.5, "acc": 100.0},
                                                "unmarked": {"computation_percentage": 0.5 + gap, "acc": 80.0}},
                                     "mark_information_bits": [0.6] * 5 + [0.1] * 3}}, **extra}
    static = record([True, True, False, False])
    runs = {"b_squared_s0": record([True, True, True, False]), "static_of_b_squared_s0": static,
            "b_squared_s1": record([True, True, True, False], kind="seed", recipe_of="b_squared_s0"),
            "static_of_b_squared_s1": static,
            "b_squared_s2": record([True, True, True, True], kind="seed", recipe_of="b_squared_s0"),
            "static_of_b_squared_s2": static,
            "d_b_squared_s0": record([True, False, False, False], gap=0.25, kind="negative", recipe_of="b_squared_s0")}
    text = "\n".join(seeds(runs))
    diffs = [25.0, 25.0, 50.0]
    p = t_p_two_df(diffs)  # one arm reaches this stage: Holm p is its own
    assert "| b_squared_s0 | 2 | 100.00 | 50.00 | +50.00 |" in text
    assert f"| b_squared_s0 | +25.00, +25.00, +50.00 | " in text and f"| {p:.3g} | {p:.3g} |" in text
    assert ("arm better" if p < 0.05 else "no difference shown") in text.splitlines()[-1]
    assert "| b_squared_s0 | 25.00 | 100.00 / 80.00 | 0.500 / 0.750 | +0.25 | 5 |" in "\n".join(negative_control(runs))
