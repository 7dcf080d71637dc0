"""Binomial intervals for an accuracy on a fixed set of test images (the tables, plots and model zoo)."""
import math
import statistics


def wilson_interval(correct, n, level=0.95):
    """(low, high): the two-sided Wilson score interval of the proportion correct / n, as fractions.

    With p = correct / n and z the normal quantile at (1 + level) / 2 (1.96 at 95 %):
    centre (p + z^2 / 2n) / (1 + z^2 / n), half-width z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2).
    It stays inside [0, 1] (exactly 0 at 0 correct, 1 at n) and, unlike p +- z sqrt(p (1 - p) / n),
    does not shrink to a point there.
    """
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n >= 1, got {correct} of {n}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie between 0 and 1, got {level}")
    z = statistics.NormalDist().inv_cdf((1 + level) / 2)
    p, shrink = correct / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z / shrink * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if correct == 0 else centre - half), (1.0 if correct == n else centre + half)


def accuracy_interval(accuracy, n, level=0.95):
    """(low, high) in %: `wilson_interval` of a top-1 accuracy in % on n images, the count correct
    taken as round(accuracy * n / 100) (exact for a record's two decimals up to 10,000 images)."""
    low, high = wilson_interval(round(accuracy * n / 100), n, level)
    return 100 * low, 100 * high
