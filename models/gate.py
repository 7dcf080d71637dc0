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


def gumbel_noise(shape, device, dtype):
    """Standard Gumbel samples -log(-log U), from torch's random stream (seeded, resumable)."""
    u = torch.rand(shape, device=device, dtype=dtype)
    return -torch.log(-torch.log(u.clamp_(min=torch.finfo(dtype).tiny)))


class LSTMGate(nn.Module):
    """Shared LSTM + linear head giving, per sample, a distribution over the options.

    gumbel_tau: None (the paper's deterministic argmax) or a temperature: in training, the hard
    decision is then the argmax of a Gumbel-perturbed softmax, softmax((logits + g) / tau), whose
    gradient it carries (Gumbel-softmax straight-through; a departure, `--gate-estimator gumbel`).
    The engine sets it before each step; evaluation never samples.

    sampling: in training, the decision is a sample from the softmax and carries no gradient (the
    policy-gradient estimator, `--gate-estimator reinforce`, a departure: core/losses.py's
    `reinforce_loss` trains the gate from the returned probabilities). Evaluation is the argmax.
    """

    def __init__(self, num_options):
        super().__init__()
        self.gumbel_tau = None
        self.sampling = False
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
        logits = self.proj(h)
        probs = F.softmax(logits, dim=-1)
        if self.training and self.gumbel_tau is not None:
            probs = F.softmax((logits + gumbel_noise(logits.shape, logits.device, logits.dtype)) / self.gumbel_tau, dim=-1)
        if self.training and self.sampling:  # torch's seeded stream: resumable
            choice = torch.multinomial(probs.detach(), 1).squeeze(1)
            return probs, F.one_hot(choice, probs.shape[-1]).to(probs.dtype), (h, c)
        hard = F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
        if self.training:
            hard = straight_through(hard, probs)
        return probs, hard, (h, c)
