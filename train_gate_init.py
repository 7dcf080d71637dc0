"""Stage 2: train only the gate, backbone frozen, toward full execution (docs/spec.md §6).

Starts from a stage-1 checkpoint (--resume); the backbone's parameters are frozen but the
model stays in train mode, so BN and activation-range statistics keep updating as in the
released code. The loss is the stage-3 loss with the target at 100 %.

    python train_gate_init.py train cifar10_rnn_gate_38 --minimum 100 --lr 0.01 \
        --resume save_checkpoints/backbone/cifar10_resnet_38/model_best.pth.tar --iters 2000 \
        --save-folder save_checkpoints/full_execution
"""
import sys

from core.continuing import gate_parameters
from core.engine import Stage, main
from core.losses import budget_loss

STAGE = Stage(name="gate_init", gated=True, parent="base", lr=0.01, iters=2000, target_cp=100.0,
              trainable=gate_parameters,
              make_loss=budget_loss)

if __name__ == "__main__":
    sys.exit(main(STAGE))
