"""Figures: box plots of DSC/NSD per target, Dice against keyframe spacing, and the timing study's bars.

Each function writes one PNG with matplotlib's Agg backend (imported only when a figure is drawn).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def box_plot(path: str, results: list[dict], methods: Sequence[str], title: str = "") -> None:
    """Box plots of DSC and NSD per target (x) and method (box colour), as a PNG at ``path``.

    ``results`` are the per-case rows of :func:`.evaluate.evaluate_files` (keys method, target, dsc, nsd).
    """
    plt = _pyplot()
    targets = list(dict.fromkeys(row["target"] for row in results))
    colours = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
    width = 0.8 / max(1, len(methods))
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.6 * len(targets) * len(methods) + 2.5), 4.2), squeeze=False)
    for ax, metric, label in zip(axes[0], ("dsc", "nsd"), ("DSC", "NSD"), strict=True):
        for m, method in enumerate(methods):
            data = [[row[metric] for row in results if row["target"] == t and row["method"] == method]
                    for t in targets]
            positions = [t + (m - (len(methods) - 1) / 2) * width for t in range(len(targets))]
            boxes = ax.boxplot(data, positions=positions, widths=width * 0.85, patch_artist=True, showfliers=False)
            for patch in boxes["boxes"]:
                patch.set_facecolor(colours[m % len(colours)])
                patch.set_alpha(0.75)
            for median in boxes["medians"]:
                median.set_color("black")
            for position, values in zip(positions, data, strict=True):
                # every case as a dot too: with few cases a box says little, and a zero-height box is invisible
                spread = np.linspace(-0.2, 0.2, len(values)) * width if len(values) > 1 else [0.0]
                ax.scatter(np.asarray(spread) + position, values, s=12, color=colours[m % len(colours)],
                           edgecolors="black", linewidths=0.4, zorder=3)
            ax.plot([], [], "s", color=colours[m % len(colours)], label=method)  # legend handle
        ax.set_xticks(range(len(targets)))
        crowded = len(targets) > 3
        ax.set_xticklabels(targets, rotation=20 if crowded else 0, ha="right" if crowded else "center")
        ax.set_xlim(-0.6, len(targets) - 0.4)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        if len(methods) > 1:
            ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



def dice_vs_spacing(rows: list[dict], path: str) -> None:
    """PNG: 3D Dice per target (and stage) against keyframe spacing K (rows of ``medsam simulate``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    def line(r: dict) -> str:  # one line per target, or per target and stage (--ablation)
        return f"{r['target']} ({r['stage']})" if r.get("stage") else r["target"]

    for name in dict.fromkeys(map(line, rows)):
        mine = [r for r in rows if line(r) == name]
        ax.plot([r["every"] for r in mine], [r["dsc"] for r in mine], marker="o", label=name)
    ax.set_xlabel("keyframe every K slices")
    ax.set_ylabel("3D Dice")
    ax.set_title("Simulated annotator: Dice vs keyframe spacing")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def study_bars(table: list, path: str, average: str = "average") -> None:
    """PNG: one panel per annotator; per case a manual bar beside an assisted bar split by phase.

    ``table`` holds ``study.Row`` objects; the row whose case is ``average`` is set apart.
    """
    plt = _pyplot()
    annotators = list(dict.fromkeys(r.annotator for r in table))
    widest = max(sum(1 for r in table if r.annotator == a) for a in annotators)
    fig, axes = plt.subplots(len(annotators), 1, figsize=(max(7.0, 0.75 * widest + 2.5), 3.4 * len(annotators) + 0.6),
                             squeeze=False)
    phase_colours = (("initial_marker", "Initial marker", "#4C72B0"), ("inference", "MedSAM inference", "#DD8452"),
                     ("refinement", "Refinement", "#55A868"))
    width = 0.38
    for ax, annotator in zip(axes[:, 0], annotators, strict=True):
        rows = [r for r in table if r.annotator == annotator]
        xs = range(len(rows))
        ax.bar([x - width / 2 for x in xs], [r.manual or 0.0 for r in rows], width, color="#8C8C8C", label="Manual")
        bottom = [0.0] * len(rows)
        for phase, label, colour in phase_colours:
            heights = [r.value(phase) or 0.0 for r in rows]
            ax.bar([x + width / 2 for x in xs], heights, width, bottom=bottom, color=colour, label=label)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        for x, r in zip(xs, rows, strict=True):
            if r.time_saved_pct is not None:
                ax.annotate(f"-{r.time_saved_pct:.0f}%", (x + width / 2, bottom[x]), textcoords="offset points",
                            xytext=(0, 2), ha="center", fontsize=7)
        if rows[-1].case == average and len(rows) > 1:
            ax.axvline(len(rows) - 1.5, color="black", linewidth=0.6, linestyle="--")
        ax.set_ylim(0, max(max(r.manual or 0.0 for r in rows), max(bottom)) * 1.18 or 1.0)  # room for the legend
        ax.set_xticks(list(xs))
        ax.set_xticklabels([("Avg." if r.case == average else r.case) for r in rows])
        ax.set_ylabel("seconds")
        ax.set_title(f"{annotator}: manual vs MedSAM-assisted annotation time", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0, 0].legend(fontsize=8, ncol=4, loc="upper left")
    axes[-1, 0].set_xlabel("case (label above an assisted bar: time saved)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
