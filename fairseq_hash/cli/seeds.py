"""The same experiment over several seeds: means, spreads, curves, shaded plots.

    mean_sd([70.8, 71.9, 71.1])                 # (71.27, 0.57): mean, sample sd
    curve_spread([run1_curve, run2_curve])      # [(update, mean, sd), ...]
    relative_curve(run_curve, dense_curve)      # [(update, ppl / dense ppl), ...]

Used by ``fairseq-hash-compare`` and the hash study (``--seeds N``).
"""
import math
import statistics
from typing import List, Optional, Sequence, Tuple


def seed_list(first: int, count: int) -> List[int]:
    return list(range(first, first + count))


def mean_sd(values) -> Tuple[Optional[float], Optional[float]]:
    """(mean, sample standard deviation) of the numbers in ``values``; sd None below two."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def format_spread(mean, sd, digits=2) -> str:
    """``71.27 ± 0.57``; the mean alone for one seed, ``-`` for none."""
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if sd is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def curve_spread(curves: Sequence[Sequence[Tuple[int, float]]]):
    """[(update, mean, sd)] over the updates every curve has (sd 0 for one curve)."""
    curves = [dict(c) for c in curves if c]
    if not curves:
        return []
    common = set.intersection(*(set(c) for c in curves))
    return [(u, *(x or 0.0 for x in mean_sd([c[u] for c in curves]))) for u in sorted(common)]


def relative_curve(curve, reference):
    """``curve``'s values over ``reference``'s at the same updates."""
    reference = dict(reference)
    return [(u, v / reference[u]) for u, v in curve if u in reference]


def plot_spread(ax, spread, **style):
    """A mean curve with ± one standard deviation shaded; ``spread`` from :func:`curve_spread`."""
    if not spread:
        return None
    xs, ys, sds = zip(*spread)
    line, = ax.plot(xs, ys, **style)
    ax.fill_between(xs, [y - s for y, s in zip(ys, sds)], [y + s for y, s in zip(ys, sds)],
                    color=line.get_color(), alpha=0.2, linewidth=0)
    return line
