"""An experiment's results: seeds aggregated, numbers formatted, tables and plots written.

    rows = over_seeds(runs, "name", keep=["experts"], keys=["test_ppl"], curve="curve")
    rows[1]["test_ppl"], rows[1]["test_ppl_sd"]  # mean and sample sd over the seeds that ran
    rows[1]["relative_curve"]                    # [(update, mean, sd)] of ppl / dense's ppl
    markdown_table(["model", "test ppl"], [[r["name"], format_spread(r["test_ppl"], r["test_ppl_sd"])]
                                           for r in rows])
    with figure("curves.png", 2) as (left, right):
        plot_spread(left, rows[0]["curve"], label="dense")

Used by the three experiments, ``fairseq-hash-compare``, ``fairseq-hash-study``
and ``fairseq-hash-finetune``: they differ in what they train, not in how they
report it.
"""
import contextlib
import json
import math
import os
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


def over_seeds(runs, name_key, keep, keys, curve, reference="dense"):
    """One row per name (``run[name_key]``, in the order first run) over its seeds.

    ``keep`` are copied from the name's first run; each of ``keys`` becomes its
    mean and sample sd over the seeds that ran (``run["ok"]``, true if absent) as
    ``key`` and ``key_sd``, and every seed's value as ``key_by_seed``. ``curve``
    ([(update, value)] a run) becomes :func:`curve_spread`'s (update, mean, sd),
    and ``relative_curve`` the same of each seed's curve over the ``reference``
    run's of that seed (empty for the reference itself).
    """
    references = {r["seed"]: r[curve] for r in runs if r[name_key] == reference}
    rows = []
    for name in dict.fromkeys(r[name_key] for r in runs):
        mine = [r for r in runs if r[name_key] == name]
        ok = [r for r in mine if r.get("ok", True)]
        row = {k: mine[0][k] for k in (name_key, *keep)}
        row.update(seeds=[r["seed"] for r in ok], seeds_run=[r["seed"] for r in mine],
                   ok=len(ok) == len(mine))
        for key in keys:
            row[key], row[key + "_sd"] = mean_sd([r[key] for r in ok])
            row[key + "_by_seed"] = [r[key] for r in mine]
        row[curve] = curve_spread([r[curve] for r in ok if r[curve]])
        row["relative_curve"] = [] if name == reference else curve_spread(
            [relative_curve(r[curve], references[r["seed"]]) for r in ok if r["seed"] in references])
        rows.append(row)
    return rows


def fmt(v, digits=2, pct=False) -> str:
    """A table cell: ``-`` for none, ``12,345`` for large whole numbers, ``71.3%`` with ``pct``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if pct:
        return f"{100 * v:.{digits}f}%"
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1000:
        return f"{int(v):,}"
    return f"{v:.{digits}f}"


def format_spread(mean, sd, digits=2, pct=False) -> str:
    """``71.27 ± 0.57``; the mean alone for one seed, ``-`` for none."""
    if mean is None or sd is None:
        return fmt(mean, digits, pct)
    return f"{fmt(mean, digits, pct)} ± {(100 * sd if pct else sd):.{digits}f}"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """Lines of a markdown table; the first column left-aligned, the others right."""
    return ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def settings_line(settings: dict, leave_out=()) -> str:
    return "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()
                                    if v is not None and k not in leave_out)


def write_json(path, results: dict):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)


def recorded_path(path, output_dir) -> str:
    """``path`` as a results file in ``output_dir`` records it: relative to that folder, so
    the results name no folder of the machine that ran them."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(output_dir))


@contextlib.contextmanager
def figure(path, panels: int, width=6.0, height=4.5, dpi=120):
    """The axes of a row of ``panels`` plots, written to ``path`` (PNG) when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    try:
        yield list(axes[0])
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def plot_spread(ax, spread, **style):
    """A mean curve with ± one standard deviation shaded; ``spread`` from :func:`curve_spread`."""
    if not spread:
        return None
    xs, ys, sds = zip(*spread)
    line, = ax.plot(xs, ys, **style)
    ax.fill_between(xs, [y - s for y, s in zip(ys, sds)], [y + s for y, s in zip(ys, sds)],
                    color=line.get_color(), alpha=0.2, linewidth=0)
    return line
