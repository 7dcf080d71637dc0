"""Paired comparisons of two models evaluated on the same images (the static-vs-dynamic study).

    python study/significance.py A.json B.json   # eval.py --json records written with --per-image

- `paired_difference`: accuracy of A minus accuracy of B on the same images, in points.
- `mcnemar_exact`: McNemar's exact test on the discordant images (A right and B wrong, and the
  reverse): two-sided binomial p-value with p = 1/2, min(1, 2 * P(X <= min(b, c))).
- `t_interval`: mean and two-sided t-interval of per-seed differences (Student t, n - 1 df).
- `wilson_interval`: the Wilson score interval of one accuracy, `correct` of `n` test images
  (`accuracy_interval`: the same from a top-1 % and n, in %), as eval.py, plots.py and the model zoo show.

Per-image correctness travels in the JSON records as `correct_bits` (bit-packed, base64: core/correct_bits.py).
"""
import argparse
import functools
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a file: the root's core/

from core.correct_bits import pack_bits, unpack_bits  # noqa: E402,F401  (re-exported)
from core.intervals import accuracy_interval, wilson_interval  # noqa: E402,F401  (re-exported)


def paired_difference(a, b):
    """Accuracy of A minus accuracy of B (points), and the discordant counts (A only, B only)."""
    a, b = torch.as_tensor(a, dtype=torch.bool), torch.as_tensor(b, dtype=torch.bool)
    if a.shape != b.shape:
        raise ValueError(f"not the same images: {tuple(a.shape)} vs {tuple(b.shape)}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return 100.0 * (only_a - only_b) / len(a), only_a, only_b


def mcnemar_exact(a, b):
    """Two-sided exact McNemar p-value for paired correctness vectors a, b."""
    _, only_a, only_b = paired_difference(a, b)
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def student_t_cdf(t, df):
    """P(T <= t) for Student's t with `df` degrees of freedom (Simpson's rule on the density)."""
    if t < 0:
        return 1 - student_t_cdf(-t, df)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    # substitute u = atan(x) so the heavy tails of df = 1, 2 stay exact on a finite interval
    f = lambda u: c * (1 + math.tan(u) ** 2 / df) ** (-(df + 1) / 2) / math.cos(u) ** 2  # noqa: E731
    end, steps = math.atan(t), 2000
    h = end / steps
    area = f(0) + f(end) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
    return 0.5 + area * h / 3


@functools.lru_cache(maxsize=None)
def student_t_quantile(p, df):
    """The t with P(T <= t) = p (bisection; about 0.1 s, so each (p, df) is computed once per process)."""
    lo, hi = -1e4, 1e4
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(values, level=0.95):
    """(mean, low, high): the two-sided t-interval of the mean of `values` (at least 2)."""
    values = [float(v) for v in values]
    n = len(values)
    if n < 2:
        raise ValueError("a t-interval needs at least two values")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t_quantile(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def correctness(record):
    """The per-image correctness vector of an eval.py record (written with --per-image)."""
    if "correct_bits" not in record:
        raise ValueError(f"{record.get('checkpoint', 'record')} has no per-image results: run eval.py --per-image")
    return unpack_bits(record["correct_bits"], record["num_samples"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="eval.py --json record (with --per-image) of model A")
    p.add_argument("b", help="the same for model B, on the same images")
    args = p.parse_args(argv)
    try:
        a, b = (correctness(json.load(open(path))) for path in (args.a, args.b))
        diff, only_a, only_b = paired_difference(a, b)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"A - B = {diff:+.2f} points on {len(a)} images; A alone right {only_a}, B alone right {only_b}; "
          f"McNemar exact p = {mcnemar_exact(a, b):.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
