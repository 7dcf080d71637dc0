"""A stage-3 start assembled from two checkpoints: the backbone of one, the gate of another.

    python -m core.assemble --backbone results/fashion-mnist-round4/checkpoints/oracle_3000_s0.pth \
        --gate results/fashion-mnist-round3/checkpoints/gate_po_marked_s0.pth --out start.pth
    python train_dfs.py train dfs_resnet20 --resume start.pth ...

Everything but the gate (the blocks' weights, their BNs, per-option BNs included, and the
activation-range buffers) comes from --backbone, without its fixed routing or static policy;
the gate (gate_embeds.*, gate.*) from --gate. The result is a stage-2 ("gate_init") checkpoint,
so stage 3 starts from it as from any stage 2; its `assembled_from` names both sources with
their SHA-256. Both must be gated networks of the same architecture, options and BN mode.
"""
import argparse
import sys

from core.checkpoint import load_checkpoint, save_checkpoint, sha256
from core.errors import DFSError, UserError
from core.evaluation import model_config
from core.provenance import provenance

GATE_PREFIXES = ("gate.", "gate_embeds.")


def is_gate(key):
    return key.startswith(GATE_PREFIXES)


def assemble(backbone_path, gate_path):
    """The assembled checkpoint (a dict); UserError when the two do not fit together."""
    backbone, gate = load_checkpoint(backbone_path), load_checkpoint(gate_path)
    a, b = model_config(backbone), model_config(gate)
    for key, what in (("name", "architecture"), ("num_classes", "classes"), ("options", "options"), ("bn", "BN")):
        if a.get(key) != b.get(key) and not (key == "bn" and {a.get(key), b.get(key)} <= {None, "shared"}):
            raise UserError(f"{backbone_path} and {gate_path} differ in {what}: {a.get(key)} against {b.get(key)}")
    if a["options"] is None:
        raise UserError(f"{backbone_path} is not a gated network (no options)")
    state = {k: v for k, v in backbone["model"].items() if not is_gate(k)}
    gate_state = {k: v for k, v in gate["model"].items() if is_gate(k)}
    if {k for k in backbone["model"] if is_gate(k)} != set(gate_state):
        raise UserError(f"{gate_path}'s gate does not fit {backbone_path}'s")
    config = {**{k: v for k, v in a.items() if k != "routes"}, "policy": None}  # no routing, no static policy
    return {"model": {**state, **gate_state}, "stage": "gate_init", "arch": backbone["arch"],
            "num_classes": backbone["num_classes"], "options": a["options"], "model_config": config, "step": 0,
            "best_acc": float("-inf"), "args": {"dataset": (backbone.get("args") or {}).get("dataset")},
            "provenance": provenance(),
            "assembled_from": {"backbone": backbone_path, "backbone_sha256": sha256(backbone_path),
                               "gate": gate_path, "gate_sha256": sha256(gate_path)}}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m core.assemble", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", required=True, help="checkpoint whose everything-but-the-gate is taken")
    p.add_argument("--gate", required=True, help="checkpoint whose gate (embeddings, LSTM, head) is taken")
    p.add_argument("--out", required=True, help="where to write the assembled stage-2 checkpoint")
    args = p.parse_args(argv)
    try:
        save_checkpoint(assemble(args.backbone, args.gate), args.out)
    except DFSError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    print(f"{args.out}: the backbone of {args.backbone}, the gate of {args.gate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
