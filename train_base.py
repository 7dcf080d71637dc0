"""Stage 1: train the plain CIFAR ResNet backbone at full precision (docs/spec.md §6).

    python train_base.py train cifar10_resnet_38 --dataset cifar10 --save-folder save_checkpoints/backbone
"""
import sys

from core.engine import Stage, main
from core.losses import cross_entropy_loss

STAGE = Stage(name="base", gated=False, parent=None, lr=0.1, iters=64000,
              trainable=lambda model: model.parameters(), make_loss=cross_entropy_loss)

if __name__ == "__main__":
    sys.exit(main(STAGE))
