"""Stage 3 under the authors' script name (= train_dfs.py), so their README commands run as written.

    python train_sp_integrate_dynamic_quantization.py train cifar10_rnn_gate_38 --minimum 50 --lr 0.01 \
        --resume save_checkpoints/full_execution/cifar10_rnn_gate_38/checkpoint_latest.pth.tar \
        --save-folder save_checkpoints/DFS
"""
import sys

from core.engine import main
from train_dfs import STAGE

if __name__ == "__main__":
    sys.exit(main(STAGE))
