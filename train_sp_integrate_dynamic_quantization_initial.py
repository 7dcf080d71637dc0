"""Stage 2 under the authors' script name (= train_gate_init.py), so their README commands run as written.

    python train_sp_integrate_dynamic_quantization_initial.py train cifar10_rnn_gate_38 --minimum 100 --lr 0.01 \
        --resume save_checkpoints/backbone/cifar10_resnet_38/model_best.pth.tar --iters 2000 \
        --save-folder save_checkpoints/full_execution
"""
import sys

from core.engine import main
from train_gate_init import STAGE

if __name__ == "__main__":
    sys.exit(main(STAGE))
