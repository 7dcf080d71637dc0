"""Rules with hand-worked answers that no other test pinned, one test per rule: the sign of the
policy search's predicted drops, the authors' ResNet-31 read as ResNet-32, the label bound of the
general array check, and --int8 following a change of the activation range alone.

Each was checked by breaking its one line on a copy of the code and watching the test fail."""
import pytest
import torch

import data
from core import authors, int8
from core.evaluation import model_config, model_from_config
from helpers import images, randomize_bn
from models import build_model
from quantize import QConv2d
from study import search_policy
from test_authors import their_state, trained_dfs


def test_search_prefers_the_block_whose_change_costs_least_accuracy():
    """The search's predicted drop of an option is reference accuracy minus the option's accuracy.

    Catches the sign flipped (`measure(...) - base`): the knapsack then ranks the most harmful
    changes first and the verification only sees those."""
    # options skip, 8-bit, full: 0, 64, 1024 units; 8 blocks = 8192 units. Target 87.5 % = 7168 units,
    # window 0.2 % = 16.4 units: totals 7152..7168. Seven full blocks make 7168, and the eighth must then
    # be skipped (an 8-bit one would make 7232); six full blocks make at most 6144 + 128. So the window
    # holds exactly the 8 policies that skip one block, more than the 5 the search verifies.
    units = search_policy.option_units(["skip", 8, "full"])
    assert units == [0, 64, 1024]
    skip_drop = [8.0, 1.0, 6.0, 3.0, 7.0, 2.0, 5.0, 4.0]  # accuracy lost by skipping block g

    def accuracy(policy):  # additive: 90 minus the drop of every changed block (8-bit costs 0.25)
        return 90.0 - sum((skip_drop[g], 0.25, 0.0)[k] for g, k in enumerate(policy))

    policy, acc, log = search_policy.search(accuracy, units, 8, 87.5)
    # right sign: the 5 least predicted drops are blocks 1, 5, 3, 7, 6 (1, 2, 3, 4, 5 points); skipping
    # block 1 measures 90 - 1 = 89. (Flipped, the 5 "least" are blocks 0, 4, 2, 6, 7, the best of them
    # block 7 at 90 - 4 = 86.)
    assert policy == (2, 0, 2, 2, 2, 2, 2, 2) and acc == 89.0
    assert search_policy.percentage(policy, units) == 87.5
    assert len(log) == 1 + 8 * 2  # the reference and every single change (the candidates are among them)


@pytest.mark.parametrize("arch,name,classes", [("cifar10_rnn_gate_31", "dfs_resnet32", 10),
                                                ("cifar100_resnet_31", "resnet32", 100)])
def test_their_resnet_31_is_imported_as_resnet_32(arch, name, classes):
    """The authors call their ResNet-32 "31": authors.convert reads it as depth 32 (5 blocks a group).

    Catches the mapping dropped in convert (`depth = int(depth)`): depth 31 gives (31 - 2) // 6 = 4 blocks
    a group, so their group*_layer4 keys are refused (and 'resnet31' is no model)."""
    gated = name.startswith("dfs")
    if gated:
        model = trained_dfs(32)
    else:
        model = build_model("resnet32", classes)
        randomize_bn(model)
        model.eval()
    raw = {"iter": 2000, "arch": arch, "state_dict": their_state(model, gated), "best_prec1": 91.5}
    ckpt, _ = authors.convert(raw, "their.pth.tar")
    assert ckpt["arch"] == ckpt["model_config"]["name"] == name and ckpt["num_classes"] == classes
    imported = model_from_config(model_config(ckpt))
    imported.load_state_dict(ckpt["model"])  # strict: every key of a depth-32 model, no other
    assert len(imported.blocks) == 3 * (32 - 2) // 6 == 15
    x = images(4, seed=3)
    with torch.no_grad():
        ours, theirs = model(x), imported.eval()(x)
    ours, theirs = (ours, theirs) if gated else ((ours,), (theirs,))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100), ("svhn", 10)])
def test_a_label_equal_to_the_number_of_classes_is_refused(name, classes):
    """data.check_arrays accepts labels 0..classes - 1 only, for every dataset it is given.

    Catches the bound loosened from `>=` to `>` (label == classes passes; Fashion-MNIST's own check in
    _load_fashion hides this for that dataset, so CIFAR-shaped arrays are used here)."""
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    last, over = torch.tensor([0, classes - 1]), torch.tensor([0, classes])
    assert data.check_arrays(name, "d", (x, last, x, last))[1] is last
    with pytest.raises(data.DatasetError, match=f"training set, from d\\): labels span 0..{classes}, "
                                                f"expected 0..{classes - 1}"):
        data.check_arrays(name, "d", (x, over, x, last))
    with pytest.raises(data.DatasetError, match=f"test set, from d\\): labels span 0..{classes}"):
        data.check_arrays(name, "d", (x, last, x, over))


@pytest.mark.skipif(not int8.available(), reason="no oneDNN quantized convolution in this build")
def test_int8_conv_follows_a_change_of_the_activation_range_alone():
    """--int8's prepared state is rebuilt when running_min or running_max changes, the weight unchanged.

    Catches the cache key reduced to the weight's version and storage (`key = (conv.weight._version,
    conv.weight.data_ptr())`): the codes would still use the first range."""
    torch.manual_seed(0)
    conv = QConv2d(16, 16, 3, 1, 1, bias=False).eval()
    x = torch.randn(3, 16, 8, 8) * 1.5 + 0.5  # reaches beyond every range below: clamped codes too
    fast = int8.Int8Conv(conv)

    def both():
        """(int8 output, fake-quantized QConv2d output) for the current range."""
        with torch.no_grad():
            conv.int8 = fast
            out = conv(x, 8)
            conv.int8 = None
            return out, conv(x, 8)

    with torch.no_grad():
        conv.running_min.fill_(-0.5)
        conv.running_max.fill_(2.0)
    outputs = [both()]
    for buffer, value in ((conv.running_max, 4.0), (conv.running_min, -2.0)):  # each of the two alone
        with torch.no_grad():
            buffer.fill_(value)  # in place: same storage, new version
        outputs.append(both())
    for (_, before), (out, fake) in zip(outputs, outputs[1:]):
        scale = fake.abs().max().item()
        # test_int8.py: each path within 2e-6 * scale of the exact float64 sum, so within 4e-6 of each other;
        # the range change itself moves the output by far more (checked, so the test means something)
        assert (out - fake).abs().max().item() <= 4e-6 * scale
        assert (before - fake).abs().max().item() > 1e-2 * scale
