"""The pictures of a run, drawn with matplotlib (headless: figures are drawn
with ``matplotlib.figure.Figure``, never pyplot, so no display and no global
state are involved):

- :func:`compression_figure`: per-layer sparsity and weight bit-width of a
  compression report (``compression_report.png``), layers named;
- :func:`training_curves_figure`: accuracy, mean sparsity, mean bits and
  relative BOPs per epoch of one run's ``metrics.jsonl``
  (``training_curves.png``);
- :func:`runs_figure`: several runs on one accuracy-vs-relative-BOPs chart
  (``python -m codeq.report RUN_DIR [RUN_DIR ...]``);
- :func:`milestones_figure`: accuracy at each saved milestone of budget runs
  (the same command, ``milestones.png``).

:func:`save_figure` writes a PNG atomically.
"""

from __future__ import annotations

import io
import math

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from codeq._io import atomic_write_bytes

__all__ = ["compression_figure", "training_curves_figure", "runs_figure", "save_figure"]

BLUE, ORANGE, GREY, GREEN = "#3465a4", "#e67e22", "#aaaaaa", "#2e8b57"


def save_figure(fig: Figure, path: str, dpi: int = 110) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return path


def compression_figure(report: dict) -> Figure:
    """Two bar charts over the layers (x axis: layer names): the fraction of
    weights that are exactly 0, and the weight bit-width (grey: no quantizer,
    or a disabled one)."""
    rows = report["layers"]
    n = max(len(rows), 1)
    fig = Figure(figsize=(min(max(8.0, 0.28 * n + 2.5), 40.0), 7.5), layout="constrained")
    ax_s, ax_b = fig.subplots(2, 1, sharex=True)
    x = list(range(len(rows)))
    names = [r["name"] for r in rows]
    quantized = [r["quantizer"] is not None and r["enabled"] is not False for r in rows]
    bars_s = ax_s.bar(x, [r["sparsity"] for r in rows], color=BLUE)
    ax_s.set_ylim(0, 1.1)
    ax_s.set_ylabel("sparsity\n(fraction of weights = 0)")
    bars_b = ax_b.bar(x, [r["bits"] for r in rows], color=[ORANGE if q else GREY for q in quantized])
    if n <= 24:  # the values on the bars, while they fit
        ax_s.bar_label(bars_s, labels=[f"{r['sparsity']:.0%}" for r in rows], fontsize=8)
        ax_b.bar_label(bars_b, labels=[f"{r['bits']:g}" for r in rows], fontsize=8)
    ax_b.set_ylabel("weight bit-width")
    max_bits = max([r["bits"] for r in rows] + [8.0])
    ax_b.set_ylim(0, 2 ** math.ceil(math.log2(max_bits)) * 1.1)
    ax_b.set_xticks(x, names, rotation=90, fontsize=8 if n <= 40 else 6)
    ax_b.set_xlabel("layer")
    if not all(quantized):
        ax_b.legend(handles=[Patch(color=ORANGE, label="quantized"), Patch(color=GREY, label="no / disabled quantizer")],
                    loc="upper right", fontsize=8)
    for ax in (ax_s, ax_b):
        ax.grid(axis="y", alpha=0.3)
    t = report["totals"]
    title = f"compression report: sparsity {t['sparsity']:.1%}"
    if t.get("relative_bops"):
        title += (f", BOPs {t['relative_bops']:.4g} of a dense 32-bit model (1/{1 / t['relative_bops']:.1f})\n"
                  f"counting every zero weight, {report['act_bits']:g}-bit activations")
    fig.suptitle(title)
    return fig


def _series(records: list[dict], key: str):
    pts = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _not_logged(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}: not logged", ha="center", va="center", transform=ax.transAxes, color="grey")


def training_curves_figure(records: list[dict], title: str = "") -> Figure:
    """2 x 2 panels over the epochs of ``records`` (metrics.jsonl lines):
    train / validation accuracy, mean sparsity, mean bit-width, relative BOPs."""
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    (ax_a, ax_s), (ax_b, ax_r) = fig.subplots(2, 2, sharex=True)
    panels = [
        (ax_a, "accuracy", [("train_acc", "train", BLUE), ("val_acc", "validation", ORANGE)], (0, 1)),
        (ax_s, "sparsity", [("sparsity_mean", "mean over layers", BLUE), ("sparsity_total", "of all weights", GREEN)],
         (0, 1)),
        (ax_b, "weight bit-width (mean over layers)", [("bits_mean", "bits", ORANGE)], None),
        (ax_r, "relative BOPs (of a dense 32-bit model)", [("relative_bops", "relative BOPs", BLUE)], None),
    ]
    for ax, name, keys, ylim in panels:
        drawn = 0
        for key, label, color in keys:
            ex, ey = _series(records, key)
            if ex:
                ax.plot(ex, ey, marker="o" if len(ex) <= 30 else None, ms=3, color=color, label=label)
                drawn += 1
        ax.set_title(name, fontsize=11)
        ax.grid(alpha=0.3)
        if not drawn:
            _not_logged(ax, name)
            continue
        if ylim is not None:
            ax.set_ylim(*ylim)
        else:  # from 0, with room above the highest point
            ax.set_ylim(0, max(y for line in ax.get_lines() for y in line.get_ydata()) * 1.08 or 1)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in (ax_b, ax_r):
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    best = max((r.get("val_acc", 0) for r in records), default=None)
    last = records[-1] if records else {}
    head = f"{title}: " if title else ""
    if best is not None and records:
        head += f"epoch {last.get('epoch')}, val_acc {last.get('val_acc', float('nan')):.4f} (best {best:.4f})"
        if isinstance(last.get("relative_bops"), (int, float)):
            head += f", relative BOPs {last['relative_bops']:.4f}"
    fig.suptitle(head)
    return fig


def runs_figure(runs: list[dict]) -> Figure:
    """Validation accuracy against relative BOPs, one colour per run: each
    run's epochs as a faint path and its last epoch as a labelled point.
    ``runs``: ``{"name", "records"}`` with ``relative_bops`` in the records."""
    fig = Figure(figsize=(9, 6.5), layout="constrained")
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    xs = []
    for run, color in zip(runs, colors):
        pts = [(r["relative_bops"], r["val_acc"]) for r in run["records"]
               if isinstance(r.get("relative_bops"), (int, float)) and isinstance(r.get("val_acc"), (int, float))]
        if not pts:
            continue
        xs += [p[0] for p in pts]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, alpha=0.3, lw=1)
        x, y = pts[-1]
        ax.scatter([x], [y], color=color, s=40, zorder=3, label=f"{run['name']}  ({y:.4f} @ {x:.4g})")
        ax.annotate(run["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8, color=color)
    positive = [x for x in xs if x > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_xscale("log")
    elif xs:
        ax.set_xlim(0, max(1.0, max(xs)) * 1.05)  # 0 to the dense model (1)
    ax.set_xlabel("relative BOPs (last epoch; faint: the epochs before)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"accuracy vs relative BOPs, {len(runs)} run(s)")
    return fig


def milestones_figure(runs: list[dict]) -> Figure:
    """Validation accuracy against the budget's metric at each saved milestone
    of a ``budget.milestones`` run (one line per run; dotted lines: the
    targets).  ``runs``: ``{"name", "records"}``; a record with a ``milestone``
    (``{"target", "value", "val_acc"}``) is a point, ``budget.metric`` names the axis."""
    fig = Figure(figsize=(9, 6.5), layout="constrained")
    ax = fig.subplots()
    metrics, xs = set(), []
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        ms = [r["milestone"] for r in run["records"] if isinstance(r.get("milestone"), dict)]
        metrics |= {r["budget"]["metric"] for r in run["records"] if isinstance(r.get("budget"), dict)}
        if not ms:
            continue
        x, y = [m["value"] for m in ms], [m["val_acc"] for m in ms]
        xs += x + [m["target"] for m in ms]
        ax.plot(x, y, marker="o", color=color, label=run["name"])
        for m in ms:
            ax.axvline(m["target"], color=color, ls=":", lw=1, alpha=0.6)
            ax.annotate(f"{m['val_acc']:.4f} @ epoch {m['epoch']}\n(target {m['target']:g})",
                        (m["value"], m["val_acc"]), textcoords="offset points", xytext=(6, 4), fontsize=8,
                        color=color)
    positive = [x for x in xs if x > 0]
    if positive and max(positive) / min(positive) > 4:
        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
    if xs:
        ax.set_xlim(min(xs) * 0.85, max(xs) * 1.4)  # room for the labels right of the points
        ax.margins(y=0.12)  # ... and above the highest one
    metric = ", ".join(sorted(metrics)) or "budget metric"
    ax.set_xlabel(f"{metric} at the milestone (dotted: the targets)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3, which="both")
    if ax.get_lines():
        ax.legend(fontsize=8, loc="best")
    else:
        _not_logged(ax, "milestones")
    ax.set_title(f"accuracy at each milestone, {len(runs)} run(s) (a later milestone has trained longer)")
    return fig
