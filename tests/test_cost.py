"""Tests of the option lists, the cost model and the MACs / BitOPs report (docs/spec.md §3-§5)."""
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE, onehot
from models import build_model
from models.cost import (PRESETS, computation_percentage, cost_penalty, option_bits, option_costs,
                         option_names, parse_options)
from models.dfs_resnet import DFSResNet, module_macs
from models.resnet import CifarResNet

DEFAULT = ("skip", 8, 10, 12, 14, 16, "full")


# --------------------------------------------------------------------------- option lists


def test_option_costs_default_exact():
    costs = option_costs(parse_options("default"))
    assert costs.tolist() == [0, 1 / 16, 25 / 256, 9 / 64, 49 / 256, 1 / 4, 1]  # exact dyadic values
    assert [Fraction(c) for c in costs.tolist()] == [Fraction(0), Fraction(1, 16), Fraction(25, 256),
                                                     Fraction(9, 64), Fraction(49, 256), Fraction(1, 4), 1]
    assert costs.dtype == torch.float32


def test_option_costs_paper_and_skipnet():
    assert option_costs(parse_options("paper")).tolist() == [0, 1 / 16, 1 / 4, 1]
    assert option_costs(parse_options("skipnet")).tolist() == [0, 1]
    assert option_costs((4, 24)).tolist() == [1 / 64, 9 / 16]


def test_parse_options_presets():
    assert parse_options("default") == DEFAULT
    assert parse_options(None) == DEFAULT
    assert parse_options("paper") == ("skip", 8, 16, "full")
    assert parse_options("skipnet") == ("skip", "full")
    assert set(PRESETS) >= {"default", "paper", "skipnet"}


@pytest.mark.parametrize("spec,expected", [
    ("skip,8,16,full", ("skip", 8, 16, "full")),
    (" skip , 8 ,16, FULL ", ("skip", 8, 16, "full")),
    ("skip,full", ("skip", "full")),
    ("8", (8,)),
    ("4,32", (4, "full")),
    ("32", ("full",)),
    ([32], ("full",)),
    (["skip", 8, "full"], ("skip", 8, "full")),
    (("skip", 8, 10, 12, 14, 16, "full"), DEFAULT),
    ("1,31", (1, 31)),
])
def test_parse_options_lists(spec, expected):
    assert parse_options(spec) == expected


@pytest.mark.parametrize("spec", ["7bit", "0", "33", "", ",", "skip,8,8", "8,32,full", "skip,skip",
                                  "half", "-4", "8.5", [0], [33], []])
def test_parse_options_errors(spec):
    with pytest.raises(ValueError):
        parse_options(spec)


def test_option_bits_and_names():
    assert [option_bits(o) for o in ("full", 8, 16)] == [None, 8, 16]
    assert option_names(DEFAULT) == ["skip", "8-bit", "10-bit", "12-bit", "14-bit", "16-bit", "full"]


# --------------------------------------------------------------------------- computation percentage


COSTS = option_costs(DEFAULT).to(DEVICE)


@pytest.mark.parametrize("k,expected", [(0, 0.0), (6, 100.0), (1, 6.25), (5, 25.0), (2, 100 * 25 / 256)])
def test_computation_percentage_uniform(k, expected):
    d = onehot([[k] * 17] * 5, 7)
    assert computation_percentage(d, COSTS).item() == pytest.approx(expected, abs=1e-5)


def test_computation_percentage_hand_mix():
    # 2 samples x 4 gated blocks (default options):
    #   sample 0: skip, 8, 16, full  -> 0 + 16/256 + 64/256 + 256/256 = 336/256
    #   sample 1: 10, 12, 14, full   -> 25/256 + 36/256 + 49/256 + 256/256 = 366/256
    # percentage = 100 * (336 + 366) / 256 / (2 * 4) = 70200 / 2048 = 34.27734375
    d = onehot([[0, 1, 5, 6], [2, 3, 4, 6]], 7)
    expected = float(Fraction(100 * 702, 256 * 8))
    assert expected == 34.27734375
    assert computation_percentage(d, COSTS).item() == pytest.approx(expected, rel=1e-6)
    # cost penalty: sum of the chosen costs = 702 / 256
    assert cost_penalty(d, COSTS).item() == pytest.approx(702 / 256, rel=1e-6)
    # every gated block weighs the same: permuting blocks changes nothing
    assert computation_percentage(d[:, [3, 1, 0, 2]], COSTS).item() == pytest.approx(expected, rel=1e-6)


def test_computation_percentage_is_per_sample_mean():
    # samples with different totals: percentage of the union = mean of the per-sample figures
    a = onehot([[6, 6, 6, 6]], 7)  # 100 %
    b = onehot([[0, 0, 0, 1]], 7)  # 100 * (1/16) / 4 = 1.5625 %
    both = torch.cat([a, b])
    assert computation_percentage(both, COSTS).item() == pytest.approx((100 + 1.5625) / 2)


def test_cost_penalty_differentiable():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, device=DEVICE, requires_grad=True)
    p = logits.softmax(-1)
    hard = F.one_hot(p.argmax(-1), 7).float() - p.detach() + p  # the gate's straight-through mask
    c = cost_penalty(hard, COSTS)
    chosen = COSTS[p.argmax(-1)].sum()
    assert c.item() == pytest.approx(chosen.item(), abs=1e-5)
    c.backward()
    # d/dlogits of sum_k p_k cost_k = p * (cost - sum_j p_j cost_j)
    pd = p.detach()
    expected = pd * (COSTS - (pd * COSTS).sum(-1, keepdim=True))
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)
    assert logits.grad.abs().sum() > 0
    # and on the decisions directly the gradient is the cost table
    d = onehot([[0, 6], [1, 5]], 7).requires_grad_()
    cost_penalty(d, COSTS).backward()
    torch.testing.assert_close(d.grad, COSTS.expand(2, 2, 7))


@pytest.mark.parametrize("k", range(7))
def test_model_computation_percentage_forced(k):
    m = build_model("dfs_resnet20").to(DEVICE).eval()
    torch.manual_seed(k)
    with torch.no_grad():
        _, d = m(torch.randn(3, 3, 32, 32, device=DEVICE), force_option=k)
    expected = {"skip": 0.0, "full": 100.0}.get(DEFAULT[k]) if isinstance(DEFAULT[k], str) \
        else 100 * DEFAULT[k] ** 2 / 1024
    assert m.computation_percentage(d).item() == pytest.approx(expected, abs=1e-5)
    assert d.shape == (3, 8, 7)


def test_model_computation_percentage_from_gate():
    """On a real gated forward: the model's figure equals the definition counted by hand."""
    torch.manual_seed(0)
    m = build_model("dfs_resnet20").to(DEVICE)
    with torch.no_grad():  # make the choices vary from block to block and sample to sample
        for e in m.gate_embeds:
            e.conv.weight.mul_(10)
        m.gate.proj.weight.normal_(0, 3)
        m.gate.proj.bias.zero_()
    m.eval()
    x = torch.randn(6, 3, 32, 32, device=DEVICE) * torch.linspace(0.5, 2, 6, device=DEVICE).view(6, 1, 1, 1)
    with torch.no_grad():
        _, d = m(x)
    choices = d.argmax(-1).tolist()
    assert len({c for row in choices for c in row}) >= 2
    cost = {o: (0 if o == "skip" else 1 if o == "full" else Fraction(o, 32) ** 2) for o in DEFAULT}
    total = sum(cost[DEFAULT[c]] for row in choices for c in row)
    expected = float(100 * total / (6 * 8))
    assert m.computation_percentage(d).item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- MACs and BitOPs


def hand_macs(depth):
    """Conv + FC multiply-accumulates of a CIFAR ResNet, per image, counted by hand.

    Returns (stem, [per-block MACs], [projection shortcut MACs per block], fc).
    """
    n = (depth - 2) // 6
    stem = 32 * 32 * 16 * (3 * 9)
    blocks, shortcuts = [], []
    cin, size = 16, 32
    for g, w in enumerate((16, 32, 64)):
        for i in range(n):
            stride = 2 if g > 0 and i == 0 else 1
            size_out = size // stride
            out = size_out * size_out * w
            macs = out * cin * 9 + out * w * 9
            sc = out * cin if cin != w else 0
            blocks.append(macs + sc)
            shortcuts.append(sc)
            cin, size = w, size_out
    return stem, blocks, shortcuts, 64 * 10


@pytest.mark.parametrize("depth,expected", [
    (38, 83_280_512), (56, 125_747_840), (74, 168_215_168), (110, 253_149_824)])
def test_module_macs_totals(depth, expected):
    stem, blocks, _, fc = hand_macs(depth)
    assert stem + sum(blocks) + fc == expected
    assert sum(module_macs(CifarResNet(depth)).values()) == expected


def test_module_macs_per_module():
    m = CifarResNet(20)
    macs = module_macs(m)
    assert macs[m.conv1] == 32 * 32 * 16 * 27 == 442_368
    assert macs[m.fc] == 640
    assert macs[m.blocks[0].conv1] == 32 * 32 * 16 * 16 * 9
    assert macs[m.blocks[3].conv1] == 16 * 16 * 32 * 16 * 9  # stride 2
    assert macs[m.blocks[3].shortcut_conv] == 16 * 16 * 32 * 16
    assert macs[m.blocks[6].shortcut_conv] == 8 * 8 * 64 * 32
    assert m.training  # mode restored


def test_dfs_macs_tables():
    m = DFSResNet(38)
    stem, blocks, shortcuts, fc = hand_macs(38)
    assert m.fixed_macs == stem + blocks[0] + fc == 5_161_600
    assert m.block_macs.tolist() == blocks[1:]
    # gate convs are not counted: the whole network equals the plain ResNet
    assert m.fixed_macs + m.block_macs.sum().item() == 83_280_512


def complexity(m, k, batch=2):
    g = m.block_macs.numel()
    return m.complexity(onehot([[k] * g] * batch, len(m.options)))


def test_complexity_all_full():
    m = DFSResNet(38).to(DEVICE)
    c = complexity(m, 6)
    assert c["macs"].item() == pytest.approx(83_280_512, rel=1e-6)
    assert c["bitops_percentage"].item() == pytest.approx(100.0, rel=1e-6)


def test_complexity_all_skip():
    m = DFSResNet(38).to(DEVICE)
    c = complexity(m, 0)
    # stem 442,368 + block 1 4,718,592 + fc 640 + the two projection shortcuts run by skip
    # (16*16*32*16 = 131,072 and 8*8*64*32 = 131,072)
    expected = 442_368 + 4_718_592 + 640 + 131_072 + 131_072
    assert expected == 5_423_744
    assert c["macs"].item() == pytest.approx(expected, rel=1e-6)
    assert c["bitops_percentage"].item() == pytest.approx(100 * expected / 83_280_512, rel=1e-6)


def test_complexity_all_8bit():
    m = DFSResNet(38).to(DEVICE)
    c = complexity(m, 1)
    # everything executes; gated blocks at (8/32)^2 = 1/16 of their full-precision BitOPs
    fixed = 5_161_600
    gated = 83_280_512 - fixed  # 78,118,912
    expected = 100 * (fixed + gated / 16) / 83_280_512  # = 100 * 10,044,032 / 83,280,512
    assert fixed + gated // 16 == 10_044_032
    assert c["macs"].item() == pytest.approx(83_280_512, rel=1e-6)
    assert c["bitops_percentage"].item() == pytest.approx(expected, rel=1e-6)


def test_complexity_hand_mix():
    m = DFSResNet(20, options="paper").to(DEVICE)  # skip, 8, 16, full; 8 gated blocks
    _, blocks, shortcuts, _ = hand_macs(20)
    fixed = m.fixed_macs
    full = fixed + sum(blocks[1:])
    # sample 0: all full; sample 1: block 3 (projection, gated index 2) skipped, others at 16 bits
    choices = [[3] * 8, [2, 2, 0, 2, 2, 2, 2, 2]]
    d = onehot(choices, 4)
    gated = blocks[1:]
    s1_macs = fixed + sum(b for j, b in enumerate(gated) if j != 2) + shortcuts[3]
    s1_bitops = fixed + sum(b / 4 for j, b in enumerate(gated) if j != 2) + shortcuts[3]  # (16/32)^2
    c = m.complexity(d)
    assert c["macs"].item() == pytest.approx((full + s1_macs) / 2, rel=1e-6)
    assert c["bitops_percentage"].item() == pytest.approx(100 * (full + s1_bitops) / 2 / full, rel=1e-6)
    # the paper's percentage ignores the MACs weights: (8 * 1 + 7 * 1/4 + 0) / 16
    assert m.computation_percentage(d).item() == pytest.approx(100 * (8 + 7 / 4) / 16)


# --------------------------------------------------------------------------- --costs (a departure)

def test_a_cost_table_drives_the_percentage_and_the_penalty():
    from models.cost import parse_costs
    options = ("skip", 8, "full")
    table = {"skip": 0.25, "8-bit": 0.5, "full": 1.0}  # e.g. measured latency relative to full
    m = build_model("dfs_resnet20", options=options, costs=table).to(DEVICE)
    assert m.option_costs.tolist() == [0.25, 0.5, 1.0]
    d = onehot([[0, 1, 2, 2, 0, 0, 1, 2], [2, 2, 2, 2, 2, 2, 2, 2]], 3)
    # sample 1: 3 x 0.25 + 2 x 0.5 + 3 x 1 = 4.75 of 8; sample 2: 8 of 8 -> (4.75 + 8) / 16
    assert m.computation_percentage(d).item() == 100 * 12.75 / 16
    assert cost_penalty(d, m.option_costs).item() == 12.75
    # per block: block g charges g + 1 times the per-option table
    per_block = [{k: v * (g + 1) for k, v in table.items()} for g in range(8)]
    mb = build_model("dfs_resnet20", options=options, costs=per_block).to(DEVICE)
    assert mb.option_costs.shape == (8, 3)
    expected = sum((g + 1) * [0.25, 0.5, 1.0][k] for g, k in enumerate([0, 1, 2, 2, 0, 0, 1, 2])) + 8 * 4.5 * 1.0
    assert cost_penalty(d, mb.option_costs).item() == pytest.approx(expected)
    # BitOPs stay the paper's, whatever the cost table
    assert torch.equal(mb.bitops_table, build_model("dfs_resnet20", options=options).to(DEVICE).bitops_table)
    for bad, words in [({"skip": 0, "8-bit": 1}, "names each option exactly once"),
                       ({"skip": 0, "8-bit": 1, "full": -1}, "finite numbers >= 0"),
                       ([table] * 3, "needs 8 rows")]:
        with pytest.raises(ValueError, match=words):
            parse_costs(bad, options, 8)


def test_without_a_cost_table_the_costs_are_the_papers_bit_for_bit():
    for options in (PRESETS["default"], PRESETS["paper"], ("skip", 2, 3, 4)):
        m = build_model("dfs_resnet20", options=options)
        assert torch.equal(m.option_costs, option_costs(options))
        same = build_model("dfs_resnet20", options=options,
                           costs=dict(zip(m.option_names, option_costs(options).tolist())))
        assert torch.equal(same.option_costs, m.option_costs)


def test_stage_3_trains_and_logs_with_the_file_costs(tmp_path):
    import json

    from core import engine
    import train_base
    import train_dfs
    from core.evaluation import load_model
    from helpers import small_synthetic
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"skip": 0.1, "8-bit": 0.9, "full": 1.0}))
    common = ["--dataset", "synthetic", "--device", "cpu", "--batch-size", "16", "--print-freq", "1"]
    with small_synthetic(64, 32):
        assert engine.main(train_base.STAGE, ["train", "resnet20", *common, "--iters", "1",
                                              "--save-folder", str(tmp_path / "b")]) == 0
        import train_gate_init
        assert engine.main(train_gate_init.STAGE, [
            "train", "dfs_resnet20", *common, "--iters", "1", "--options", "skip,8,full",
            "--resume", str(tmp_path / "b/resnet20/model_best.pth.tar"), "--save-folder", str(tmp_path / "g")]) == 0
        assert engine.main(train_dfs.STAGE, [
            "train", "dfs_resnet20", *common, "--iters", "2", "--costs", str(costs), "--minimum", "50",
            "--resume", str(tmp_path / "g/dfs_resnet20/checkpoint_latest.pth.tar"), "--save-folder", str(tmp_path / "d")]) == 0
    folder = tmp_path / "d" / "dfs_resnet20"
    for line in (folder / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        shares = torch.tensor(r["block_shares"])
        assert r["computation_percentage"] == pytest.approx(100 * float((shares @ torch.tensor([0.1, 0.9, 1.0])).mean()), abs=1e-4)
    model, _ = load_model(str(folder / "model_best.pth.tar"), "cpu")  # eval rebuilds the same table
    assert model.option_costs.tolist() == pytest.approx([0.1, 0.9, 1.0])
