"""The recurrent gate of DFS (docs/spec.md §3).

One LSTM (input 10, hidden 10) is shared by all gated blocks; each block owns a small
embedding (global average pool, then a 1x1 conv to 10 channels) of the previous block's
output. The LSTM state is created per forward pass on the input's device, so nothing is
stored on the module between calls.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

EMBED_DIM = 10
HIDDEN_DIM = 10


class GateEmbedding(nn.Module):
    """Pooled 1x1-conv embedding of a feature map: [B, C, H, W] -> [B, EMBED_DIM]."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, EMBED_DIM, 1)

    def forward(self, x):
        return torch.flatten(self.conv(x.mean((2, 3), keepdim=True)), 1)


def straight_through(hard, probs):
    """`hard`'s values with the gradient of `probs` (the straight-through estimator of the decisions)."""
    return hard - probs.detach() + probs


class LSTMGate(nn.Module):
    """Shared LSTM + linear head giving, per sample, a distribution over the options."""

    def __init__(self, num_options):
        super().__init__()
        # LSTMCell is one step of a one-layer nn.LSTM; it also keeps torch.compile graphs whole.
        self.lstm = nn.LSTMCell(EMBED_DIM, HIDDEN_DIM)
        self.proj = nn.Linear(HIDDEN_DIM, num_options)

    def init_state(self, batch_size, device, dtype=torch.float32):
        """Zero (h, c) for a new forward pass."""
        h = torch.zeros(batch_size, HIDDEN_DIM, device=device, dtype=dtype)
        return h, torch.zeros_like(h)

    def forward(self, feat, state):
        """feat [B, EMBED_DIM] -> probs [B, O], hard [B, O], new state.

        `hard` is the one-hot argmax; in training it carries the straight-through
        gradient of `probs` (value one-hot, gradient that of the softmax).
        """
        h, c = self.lstm(feat, state)
        probs = F.softmax(self.proj(h), dim=-1)
        hard = F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
        if self.training:
            hard = straight_through(hard, probs)
        return probs, hard, (h, c)
