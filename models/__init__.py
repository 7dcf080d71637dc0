"""Model registry: canonical names `resnet{depth}` / `dfs_resnet{depth}` and the authors' aliases."""
import re
from functools import partial

from models.cost import PRESETS, option_costs, option_names, parse_options, parse_policy  # noqa: F401
from models.dfs_resnet import DFSResNet
from models.resnet import DEPTHS, CifarResNet

MODELS = {
    **{f"resnet{d}": partial(CifarResNet, d) for d in DEPTHS},
    **{f"dfs_resnet{d}": partial(DFSResNet, d) for d in DEPTHS},
}
ALIAS_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}
# The authors' spelling: cifar10_resnet_38, cifar100_rnn_gate_74, ... (their ResNet-32 is "31").
_ALIAS = re.compile(r"^(cifar10|cifar100|svhn)_(resnet|rnn_gate)_(\d+)$")


def resolve_name(name):
    """(canonical name, number of classes implied by the name or None); ValueError if unknown."""
    if name in MODELS:
        return name, None
    m = _ALIAS.match(name)
    if m:
        depth = 32 if m.group(3) == "31" else int(m.group(3))
        canonical = ("resnet" if m.group(2) == "resnet" else "dfs_resnet") + str(depth)
        if canonical in MODELS:
            return canonical, ALIAS_CLASSES[m.group(1)]
    raise ValueError(f"unknown architecture {name!r}; valid: {', '.join(MODELS)} "
                     f"or aliases like cifar10_resnet_38, cifar100_rnn_gate_74 (depths {DEPTHS})")


def is_gated(name):
    """Whether `name` builds a DFS (gated) network."""
    return resolve_name(name)[0].startswith("dfs_")


def build_model(name, num_classes=None, options=None, stochastic_act_rounding=False, policy=None, costs=None,
                bn=None, routes=None):
    """Build a model by canonical name or alias. `options`, `policy`, `costs`, `bn` ("shared" or
    "per-option") and `routes` apply to DFS networks only."""
    canonical, implied = resolve_name(name)
    if num_classes is not None and implied is not None and num_classes != implied:
        raise ValueError(f"{name} has {implied} classes, asked for {num_classes}")
    num_classes = num_classes or implied or 10
    kwargs = dict(num_classes=num_classes, stochastic_act_rounding=stochastic_act_rounding)
    if canonical.startswith("dfs_"):
        kwargs.update(options=options, policy=policy, costs=costs, bn=bn, routes=routes)
    elif options is not None or policy is not None or costs is not None or routes is not None \
            or bn not in (None, "shared"):
        raise ValueError(f"{name} is a plain ResNet; options apply to the gated dfs_resnet models")
    return MODELS[canonical](**kwargs)
