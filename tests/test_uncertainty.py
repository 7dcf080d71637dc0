"""Each accuracy with its 95 % Wilson score interval on the number of test images: the interval by
hand, eval.py's table, and the accuracy-vs-computation plot (bars, the full-precision reference, a
y range that does not turn a gap within the intervals into a cliff)."""
import math

import pytest

from core import plots
from study import significance


def test_wilson_interval_by_hand():
    # z = 1.959964 (95 %), z^2 = 3.841459; centre = (p + z^2 / 2n) / (1 + z^2 / n),
    # half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2).
    # 8 of 10: p = 0.8, 1 + z^2/n = 1.3841459; centre = (0.8 + 0.1920730) / 1.3841459 = 0.7167401;
    #   half = 1.959964 / 1.3841459 * sqrt(0.016 + 0.0096036) = 1.4160109 * 0.1600113 = 0.2265777
    #   -> [0.4901624, 0.9433178]
    low, high = significance.wilson_interval(8, 10)
    assert low == pytest.approx(0.4901624, abs=1e-6) and high == pytest.approx(0.9433178, abs=1e-6)
    # 50 of 100: p = 0.5, centre 0.5 exactly; 1 + z^2/n = 1.0384146;
    #   half = 1.959964 / 1.0384146 * sqrt(0.0025 + 0.0000960) = 1.8874581 * 0.0509513 = 0.0961685
    low, high = significance.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038315, abs=1e-6) and high == pytest.approx(0.5961685, abs=1e-6)
    # 0 of 10: centre = half = 0.1920730 / 1.3841459 = 0.1387664 -> [0, 0.2775328] (exactly 0 below)
    assert significance.wilson_interval(0, 10) == (0.0, pytest.approx(0.2775328, abs=1e-6))
    assert significance.wilson_interval(10, 10) == (pytest.approx(1 - 0.2775328, abs=1e-6), 1.0)
    # another level: z = 1.644854 at 90 %, 8 of 10 -> [0.5408, 0.9314] (the same formula)
    z = 1.6448536
    centre, shrink = (0.8 + z * z / 20) / (1 + z * z / 10), 1 + z * z / 10
    half = z / shrink * math.sqrt(0.016 + z * z / 400)
    assert significance.wilson_interval(8, 10, 0.90) == (pytest.approx(centre - half, abs=1e-6),
                                                         pytest.approx(centre + half, abs=1e-6))
    # a top-1 % on 10,000 images: 93.08 % is 9,308 correct
    assert significance.accuracy_interval(93.08, 10000) == tuple(
        100 * b for b in significance.wilson_interval(9308, 10000))
    for bad in [(11, 10), (-1, 10), (0, 0)]:
        with pytest.raises(ValueError):
            significance.wilson_interval(*bad)


def record(cp, acc, n=10000, options=("skip", "8-bit", "full"), name="run"):
    return {"computation_percentage": cp, "accuracy": acc, "num_samples": n, "option_names": list(options),
            "arch": "dfs_resnet20", "checkpoint": f"save/{name}/dfs_resnet20/model_best.pth.tar",
            "decision_distribution": None}


def test_eval_table_shows_each_top1_with_its_interval():
    import eval as eval_script
    text = eval_script.table([record(19.79, 93.08), record(100.0, 80.0, n=10, options=["full"])])
    lines = text.splitlines()
    assert lines[0] == ("| computation % | top-1 % | 95 % interval (Wilson score on the test images) | test images "
                        "| arch | checkpoint |")
    assert lines[2].startswith("| 19.79 | 93.08 | [92.57, 93.56] | 10000 | dfs_resnet20 |")
    assert lines[3].startswith("| 100.00 | 80.00 | [49.02, 94.33] | 10 |")  # 8 of 10, as by hand above


def test_accuracy_axis_is_never_narrower_than_a_few_intervals():
    close = [significance.accuracy_interval(a, 10000) for a in (93.03, 93.06, 93.09)]
    widest = max(h - lo for lo, h in close)
    bottom, top = plots.accuracy_ylim(close)
    assert top - bottom >= plots.MIN_SPAN_INTERVALS * widest  # 0.06 points apart: no cliff
    assert bottom < min(lo for lo, _ in close) and top > max(h for _, h in close)
    wide = [significance.accuracy_interval(a, 10000) for a in (63.36, 93.2)]
    bottom, top = plots.accuracy_ylim(wide)
    assert bottom < wide[0][0] and top > wide[1][1] and top - bottom < 40  # a real gap keeps its scale
    assert plots.accuracy_ylim([(99.8, 100.0), (99.5, 99.9)])[1] <= 100  # kept inside [0, 100]
    assert plots.accuracy_ylim([(90.0, 90.0)]) is None  # no intervals: matplotlib's own range


def test_accuracy_plot_draws_each_interval_and_the_full_precision_reference(tmp_path, monkeypatch):
    plt = plots._pyplot()
    bars, lines, ylims = [], [], []
    for name, store in (("errorbar", bars), ("axhline", lines), ("set_ylim", ylims)):
        real = getattr(plt.Axes, name)
        monkeypatch.setattr(plt.Axes, name, lambda self, *a, _real=real, _store=store, **kw: (
            _store.append((a, kw)), _real(self, *a, **kw))[1])
    records = [record(10.19, 93.06, name="a"), record(19.79, 93.08, name="b"),
               record(100.0, 93.2, options=["full"], name="backbone")]
    plots.plot_accuracy(records, str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").stat().st_size > 1000
    (x, y), kw = bars[0]
    low, high = significance.accuracy_interval(93.06, 10000)
    assert list(x) == [10.19, 19.79] and kw["yerr"][0][0] == pytest.approx(93.06 - low)
    assert kw["yerr"][1][0] == pytest.approx(high - 93.06)
    assert bars[1][1]["label"].startswith("full (reference")
    assert [a[0] for a, _ in lines] == [93.2]  # the reference across the plot
    bottom, top = ylims[-1][0]
    assert bottom < low and top > significance.accuracy_interval(93.2, 10000)[1]
    assert top - bottom >= plots.MIN_SPAN_INTERVALS * (high - low)
