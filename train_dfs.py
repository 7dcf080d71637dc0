"""Stage 3: train backbone and gate together with the budget penalty toward --target-cp (docs/spec.md §6).

    python train_dfs.py train cifar10_rnn_gate_38 --minimum 50 --lr 0.01 \
        --resume save_checkpoints/full_execution/cifar10_rnn_gate_38/checkpoint_latest.pth.tar \
        --save-folder save_checkpoints/DFS
"""
import sys

from core.engine import Stage, main
from core.losses import budget_loss

STAGE = Stage(name="dfs", gated=True, parent="gate_init", lr=0.01, iters=64000, target_cp=50.0,
              trainable=lambda model: model.parameters(), make_loss=budget_loss)

if __name__ == "__main__":
    sys.exit(main(STAGE))
