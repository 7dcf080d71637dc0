"""Per-image correctness in a record: which test images a model got right, as base64 of packed bits
(eval.py's `correct_bits`, written with --per-image or --controls; read by study/significance.py)."""
import base64

import torch


def pack_bits(correct):
    """A bool vector as base64 of its bits (first image in the highest bit of the first byte)."""
    bits = torch.as_tensor(correct, dtype=torch.bool).flatten().tolist()
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 0x80 >> (i % 8)
    return base64.b64encode(bytes(out)).decode("ascii")


def unpack_bits(text, n):
    """The bool vector of `n` images that `pack_bits` packed."""
    raw = base64.b64decode(text)
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"packed bits hold {8 * len(raw)} images at most, not {n}")
    return torch.tensor([bool(raw[i // 8] & (0x80 >> (i % 8))) for i in range(n)])
