"""The command line of the three stages: the authors' flags and ours, validation, and which settings
define a run (so that continuing a run keeps them). Returns new namespaces; never changes its input.
"""
import argparse
import json
import math

import torch

import data
from core import cli, distributed
from core.errors import UserError, value_error
from models import is_gated, parse_options, resolve_name
from models.dfs_resnet import EXECUTIONS
from models.norms import BN_MODES


TITLES = {"base": "Stage 1: train the plain CIFAR ResNet backbone at full precision.",
          "gate_init": "Stage 2: train only the gate, backbone frozen, toward full execution.",
          "dfs": "Stage 3: train backbone and gate together with the budget penalty toward --minimum."}


def build_parser(stage):
    """The authors' command line (`train|test ARCH`, --minimum, --beta, ...) plus our own flags, in groups."""
    p = cli.Parser(description=TITLES.get(stage.name, f"DFS stage {stage.name}"))
    p.add_argument("cmd", choices=["train", "test"], help="train, or test a checkpoint given with --resume")
    p.add_argument("arch", help="e.g. resnet38, dfs_resnet38, cifar10_resnet_38, cifar10_rnn_gate_38")
    a = p.add_argument_group("the authors' flags")
    a.add_argument("--iters", type=int, default=stage.iters, help="iterations of this stage")
    a.add_argument("--lr", type=float, default=stage.lr, help="learning rate")
    a.add_argument("--resume", default="", help="checkpoint of this stage (continue) or of the previous one (start)")
    a.add_argument("--save-folder", default="save_checkpoints", help="runs go to SAVE_FOLDER/ARCH")
    a.add_argument("--dataset", "-d", choices=data.DATASETS, help="default: from the arch alias, else cifar10")
    a.add_argument("--eval-every", type=int, default=1000, help="evaluate and checkpoint every N iterations")
    a.add_argument("--batch-size", type=int, default=128, help="the global batch")
    a.add_argument("--print-freq", "--log-interval", type=int, default=100, help="log every N iterations")
    a.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    a.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    a.add_argument("--step-ratio", type=float, default=0.1, help="lr factor at each of --lr-steps")
    a.add_argument("--warm-up", action="store_true", help="lr 0.01 for the first 400 iterations")
    a.add_argument("--workers", type=int, default=0, help="ignored: data is held and augmented in memory")
    a.add_argument("--verbose", action="store_true", help="accepted: per-option shares are always logged")
    a.add_argument("--pretrained", action="store_true", help="accepted: the authors' factories ignore it too")
    a.add_argument("--start-iter", type=int, default=0,
                   help="only 0: a run continues exactly from --resume SAVE_FOLDER/ARCH/checkpoint_latest.pth.tar")
    a.add_argument("--proceed", default="False", choices=["True", "False"],
                   help="only False: --resume of this stage's checkpoint continues it, of the previous stage starts at 0")
    if stage.gated:
        a.add_argument("--target-cp", "--minimum", type=float, default=stage.target_cp,
                       help="target computation percentage in (0, 100]")
        a.add_argument("--cost-weight", "--beta", type=float, default=1e-5, help="weight of the cost penalty")
        a.add_argument("--gate-type", default="rnn", choices=["ff", "rnn"], help="only rnn: the paper's LSTM gate")
        a.add_argument("--computation_cost", "--computation-cost", default="True", choices=["True", "False"],
                       help="only True: the penalty is always on (--beta 0 turns it off)")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", default="data", help="where the dataset is (or is downloaded to)")
    d.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    d.add_argument("--val-size", type=int, default=0,
                   help="hold out this many training images to select model_best (0: the test set, as the authors)")
    r = p.add_argument_group("run (ours)")
    r.add_argument("--lr-steps", type=int, nargs="*", default=[32000, 48000], help="iterations where lr is multiplied by --step-ratio")
    r.add_argument("--seed", type=int, default=0, help="seed of data order, initialisation and dither")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N")
    r.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that holds a run: its files move aside to "
                        "SAVE_FOLDER/ARCH.replaced-TIME (nothing is deleted)")
    if stage.gated:
        r.add_argument("--options", default=None,
                       help="preset (default, paper, skipnet) or list like skip,8,16,full; default: "
                            "the checkpoint's, else 'default'")
        r.add_argument("--execution", choices=EXECUTIONS, default="dynamic",
                       help="training forward (same numbers either way): dynamic back-propagates only "
                            "through the options some sample chose (one host sync per block); mixed "
                            "keeps every option in the autograd graph (no sync; may pay on a GPU)")
    x = p.add_argument_group("departures from the paper (off by default; docs/departures.md)")
    x.add_argument("--tf32", action="store_true", help="allow TF32 (blurs bitwidths above 10; spec §8)")
    # Stages 2-3 accept --sync-bn only to refuse it with the reason (validate_args), so it is not offered there.
    x.add_argument("--sync-bn", action="store_true",
                   help=argparse.SUPPRESS if stage.gated else
                   "under torchrun: batch-norm statistics over the global batch, not per process (CUDA only)")
    if stage.gated:
        x.add_argument("--stochastic-act-rounding", action="store_true",
                       help="the released code's dithered activation rounding")
        x.add_argument("--bn", choices=BN_MODES, default=None,
                       help="per-option: every option of a gated block has its own batch norms, whose statistics "
                            "come from the images routed to it (models/norms.py); default: the checkpoint's, "
                            "else shared (the paper's)")
        x.add_argument("--costs", default=None,
                       help="a JSON cost table instead of (b/32)^2 for the penalty and the computation percentage: "
                            "{option name: cost relative to full} or a list of one per gated block (e.g. measured latency)")
    if stage.name == "dfs":
        x.add_argument("--policy", default=None,
                       help="a static network instead of the gate (a baseline): one option per gated block, "
                            "e.g. 8,8,skip,16,... or a JSON file of option names; one name applies to every block")
        x.add_argument("--route-marked", default=None, metavar="POLICY",
                       help="with --route-unmarked, on a fashion-mnist-marked* data set: a fixed per-input routing "
                            "instead of the gate (an oracle): framed images take this policy (syntax of --policy)")
        x.add_argument("--route-unmarked", default=None, metavar="POLICY",
                       help="the policy of the images without a frame (see --route-marked)")
        x.add_argument("--budget-loss", choices=BUDGET_LOSSES, default="signed",
                       help="the budget term: signed, the paper's beta*s*C; squared, beta*(cp/100 - target/100)^2 "
                            "(ConvNet-AIG, DynConv); deadband, FracTrain's signed term with weight 0.1 within "
                            "--budget-band of the target and capped at --budget-cap x cross entropy")
        x.add_argument("--budget-band", type=float, default=0.0,
                       help="deadband: half-width of the band around the target, in percentage points (FracTrain's --relax)")
        x.add_argument("--budget-cap", type=float, default=0.1,
                       help="deadband: the budget term at most this fraction of the batch's cross entropy "
                            "(FracTrain's --ada_beta, a tenth); 0: no cap")
        x.add_argument("--gate-estimator", choices=GATE_ESTIMATORS, default="argmax",
                       help="argmax: the paper's deterministic decision with a straight-through gradient; gumbel: "
                            "in training a Gumbel-softmax sample (hard forward, the softmax's gradient), annealed "
                            "over --gumbel-tau; reinforce: in training a sample of the softmax, the gate trained by "
                            "the policy gradient of each image's cross entropy (leave-one-out baseline) and the "
                            "budget term of the expected cost (one process); evaluation is the argmax in every case")
        x.add_argument("--gumbel-tau", default="5:0.5", metavar="START:END",
                       help="gumbel: the temperature, annealed exponentially from START at iteration 0 to END at --iters")
        x.add_argument("--distill-marked", default=None, metavar="POLICY",
                       help="with --distill-unmarked and --train gate, on a fashion-mnist-marked* data set: train the "
                            "gate to reproduce this routing (framed images this policy), by cross entropy against it, "
                            "the network running the routing; instead of the budget loss")
        x.add_argument("--distill-unmarked", default=None, metavar="POLICY",
                       help="the policy the gate learns for images without a frame (see --distill-marked)")
        x.add_argument("--train", choices=TRAINED, default="all",
                       help="all: the whole network learns (the paper's); gate: only the gate (embeddings, LSTM, head) "
                            "learns, the backbone runs in eval mode (BN running statistics and activation ranges "
                            "fixed, none updated) and its weights are frozen")
    return p


BUDGET_LOSSES = ("signed", "squared", "deadband")
GATE_ESTIMATORS = ("argmax", "gumbel", "reinforce")
TRAINED = ("all", "gate")  # --train: what stage 3 optimises


def parse_tau(spec):
    """--gumbel-tau START:END as two positive floats; ValueError otherwise."""
    try:
        start, end = (float(v) for v in str(spec).split(":"))
    except ValueError:
        raise ValueError(f"--gumbel-tau takes START:END, e.g. 5:0.5, got {spec!r}") from None
    if not (math.isfinite(start) and math.isfinite(end) and start > 0 and end > 0):
        raise ValueError(f"--gumbel-tau temperatures must be finite and > 0, got {spec!r}")
    return start, end


def gumbel_tau(args, step):
    """The temperature at `step`: START * (END / START) ** (step / iters)."""
    start, end = parse_tau(args.gumbel_tau)
    return start * (end / start) ** (min(step, args.iters) / args.iters)


def routes_of(args):
    """The routing the command line asks for: {"marked": [...], "unmarked": [...]} or None."""
    if getattr(args, "route_marked", None) is None:
        return None
    return {"marked": read_policy(args.route_marked), "unmarked": read_policy(args.route_unmarked)}


def parse_args(stage, argv=None):
    """Parsed and validated arguments (argparse's usage error and exit status 2 otherwise)."""
    p = build_parser(stage)
    try:
        return validate_args(stage, p.parse_args(argv))
    except ValueError as e:
        value_error(p, str(e))


def given_args(stage, argv=None):
    """Names of the arguments set on the command line, as opposed to left at their defaults."""
    p = build_parser(stage)
    unset = object()  # argparse fills in a default only where the namespace lacks the attribute
    namespace = argparse.Namespace(**dict.fromkeys(vars(p.parse_args(argv)), unset))
    return {name for name, value in vars(p.parse_args(argv, namespace=namespace)).items() if value is not unset}


# What defines a run: continuing it takes these from its checkpoint (an explicitly given value
# that differs is refused). Every other flag may change; options are checked against the model's own.
RUN_SETTINGS = {"dataset": "--dataset", "val_size": "--val-size", "batch_size": "--batch-size",
                "seed": "--seed", "lr": "--lr", "lr_steps": "--lr-steps", "step_ratio": "--step-ratio",
                "warm_up": "--warm-up", "momentum": "--momentum", "weight_decay": "--weight-decay",
                "tf32": "--tf32", "target_cp": "--target-cp/--minimum", "cost_weight": "--cost-weight/--beta",
                "stochastic_act_rounding": "--stochastic-act-rounding", "policy": "--policy", "costs": "--costs",
                "bn": "--bn", "route_marked": "--route-marked", "route_unmarked": "--route-unmarked",
                "budget_loss": "--budget-loss", "budget_band": "--budget-band", "budget_cap": "--budget-cap",
                "gate_estimator": "--gate-estimator", "gumbel_tau": "--gumbel-tau", "train": "--train",
                "distill_marked": "--distill-marked", "distill_unmarked": "--distill-unmarked"}


def continue_run(args, saved, given, where):
    """The settings to continue a run with: each of RUN_SETTINGS from `saved` (the run's own
    arguments); one given on the command line with another value is refused. Returns a new namespace."""
    args = argparse.Namespace(**vars(args))
    def show(value):
        if isinstance(value, bool):
            return "on" if value else "off"
        return " ".join(map(str, value)) if isinstance(value, list) else str(value)
    for name, flag in RUN_SETTINGS.items():
        if name not in saved or not hasattr(args, name):
            continue
        if name in given and getattr(args, name) != saved[name]:
            raise UserError(f"{flag} {show(getattr(args, name))} differs from the run {where} continues "
                            f"({flag} {show(saved[name])}); leave it out to continue that run")
        setattr(args, name, saved[name])
    return args


def validate_args(stage, args):
    """The arguments checked and completed (a new namespace); ValueError carries the message."""
    args = argparse.Namespace(**vars(args))
    canonical, implied_classes = resolve_name(args.arch)
    if is_gated(canonical) != stage.gated:
        kind = "a gated dfs_resnet / *_rnn_gate_*" if stage.gated else "a plain resnet / *_resnet_*"
        raise ValueError(f"this stage trains {kind} architecture, got {args.arch}")
    if args.dataset is None:
        args.dataset = args.arch.split("_")[0] if implied_classes else "cifar10"
    if implied_classes and data.NUM_CLASSES[args.dataset] != implied_classes:
        raise ValueError(f"{args.arch} has {implied_classes} classes but {args.dataset} has "
                         f"{data.NUM_CLASSES[args.dataset]}")
    for name in ("iters", "batch_size", "eval_every", "print_freq"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    authors = {"start_iter": (args.start_iter != 0, "--start-iter: a run continues exactly from --resume "
                                                   "SAVE_FOLDER/ARCH/checkpoint_latest.pth.tar; leave --start-iter out"),
               "proceed": (args.proceed == "True", "--proceed True is not needed: --resume of this stage's checkpoint "
                                                   "continues it exactly, of the previous stage starts at iteration 0"),
               "gate_type": (getattr(args, "gate_type", "rnn") == "ff", "--gate-type ff: only the paper's recurrent "
                                                                         "gate (rnn) is implemented"),
               "computation_cost": (getattr(args, "computation_cost", "True") == "False",
                                    "--computation_cost False: use --beta 0 to train without the cost penalty")}
    for refused, message in authors.values():
        if refused:
            raise ValueError(message)
    for name in ("proceed", "computation_cost"):  # the authors' "True"/"False" strings, kept as booleans
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, getattr(args, name) == "True")
    if args.val_size < 0:
        raise ValueError("--val-size must be >= 0")
    for name in ("lr", "momentum", "weight_decay", "step_ratio", "cost_weight"):
        value = getattr(args, name, 0.0)  # cost_weight: gated stages only
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.sync_bn and stage.gated:  # see docs/distributed.md
        raise ValueError("--sync-bn is for stage 1: a gated block may run a batch norm with autograd on one "
                         "process and without on another, and SyncBatchNorm's backward needs them all")
    if stage.gated:
        if args.options is not None:
            args.options = list(parse_options(args.options))
        if getattr(args, "policy", None) is not None:
            args.policy = read_policy(args.policy)
        if args.costs is not None:
            args.costs = read_json(args.costs, "--costs")
        if not 0 < args.target_cp <= 100:
            raise ValueError(f"--target-cp/--minimum must be in (0, 100], got {args.target_cp}")
    if stage.name == "dfs":
        validate_departures(args)
    if distributed.unusable(args.device):  # a device this machine has, not just a well-formed name
        raise ValueError(distributed.unusable(args.device))
    return args


def given_per_half(args, name):
    """Whether --NAME-marked/--NAME-unmarked (a policy for each half of a marked data set) are given:
    both or neither, and only on a fashion-mnist-marked* set (ValueError otherwise)."""
    marked, unmarked = getattr(args, f"{name}_marked"), getattr(args, f"{name}_unmarked")
    if (marked is None) != (unmarked is None):
        raise ValueError(f"--{name}-marked and --{name}-unmarked go together: one policy for each half")
    if marked is not None and args.dataset not in data.MARKED:
        raise ValueError(f"--{name}-marked/--{name}-unmarked route by the frame of {' or '.join(data.MARKED)}, "
                         f"not {args.dataset}")
    return marked is not None


def read_per_half(args, name):
    """--NAME-marked/--NAME-unmarked read as policies (read_policy), in place."""
    for half in ("marked", "unmarked"):
        setattr(args, f"{name}_{half}", read_policy(getattr(args, f"{name}_{half}")))


def validate_departures(args):
    """Stage 3's departures: a routing, the budget term, the gate's estimator, what trains (ValueError)."""
    if given_per_half(args, "route"):
        if args.policy is not None:
            raise ValueError("--policy and --route-marked/--route-unmarked: choose one")
        read_per_half(args, "route")
    for name in ("budget_band", "budget_cap"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    parse_tau(args.gumbel_tau)
    if given_per_half(args, "distill"):
        if args.train != "gate" or args.gate_estimator != "argmax" or args.policy is not None \
                or args.route_marked is not None:
            raise ValueError("--distill-marked/--distill-unmarked train the gate alone: with --train gate, and "
                             "without --policy, --route-marked or another --gate-estimator")
        read_per_half(args, "distill")
    no_gate = args.policy is not None or args.route_marked is not None
    for flag, trains_gate in (("--gate-estimator reinforce", args.gate_estimator == "reinforce"),
                              ("--train gate", args.train == "gate")):
        if trains_gate and no_gate:
            raise ValueError(f"{flag} trains the gate, which a static --policy or a --route-marked routing does not run")
    if args.gate_estimator == "reinforce" and args.batch_size < 2:
        raise ValueError("--gate-estimator reinforce needs --batch-size of at least 2 (its baseline is the other images' mean)")


def read_json(path, flag):
    """The JSON value of a file given to `flag`; ValueError in one line if it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path}: cannot read it as JSON ({getattr(e, 'strerror', None) or e})")


def read_policy(spec):
    """--policy's option names: a comma list, or a JSON file holding a list (or {"policy": [...]})."""
    if not isinstance(spec, str) or not spec.endswith(".json"):
        return [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    value = read_json(spec, "--policy")
    value = value.get("policy") if isinstance(value, dict) else value
    if not isinstance(value, list):
        raise ValueError(f"--policy {spec}: expected a list of option names (or {{\"policy\": [...]}})")
    return [str(v) for v in value]


