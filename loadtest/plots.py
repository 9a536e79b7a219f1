"""PNG plots of a session (matplotlib, Agg backend: no display needed).

- `latency_throughput.png`: p50 (solid) and p99 (dashed) latency against achieved requests/s,
  one colour per target: where a server's curve turns upward is its usable capacity.
- `latency_cdf.png`: one panel per load level, the latency CDF of every target in it.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from inferd.loadtest.latency import LatencySummary, empirical_cdf
from inferd.loadtest.session import SessionReport


def plot_latency_throughput(session: SessionReport, path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for index, target in enumerate(session.targets):
        color = f"C{index}"
        for mode, marker in (("closed", "o"), ("open", "s")):
            levels = sorted(
                (r for r in target.levels if r.level.mode == mode), key=lambda r: r.level.x
            )
            if not levels:
                continue
            x = [r.requests_per_s for r in levels]
            summaries = [LatencySummary.of(r.measured.latencies) for r in levels]
            suffix = "" if mode == "closed" else " (open loop)"
            ax.plot(
                x,
                [s.p50_ms for s in summaries],
                marker=marker,
                color=color,
                label=f"{target.spec.name} p50{suffix}",
            )
            ax.plot(
                x,
                [s.p99_ms for s in summaries],
                marker=marker,
                color=color,
                linestyle="--",
                label=f"{target.spec.name} p99{suffix}",
            )
            for r, px, s in zip(levels, x, summaries, strict=True):
                ax.annotate(
                    r.level.label,
                    (px, s.p50_ms),
                    textcoords="offset points",
                    xytext=(3, -10),
                    fontsize=7,
                    color=color,
                )
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or "Latency against throughput")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_latency_cdf(session: SessionReport, path: Path, title: str = "") -> Path:
    labels: list[str] = []
    for target in session.targets:
        for result in target.levels:
            if result.level.label not in labels:
                labels.append(result.level.label)
    panels = max(1, len(labels))
    columns = min(3, panels)
    rows = math.ceil(panels / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 3.2 * rows), dpi=110, squeeze=False
    )
    for panel, label in enumerate(labels):
        ax = axes[panel // columns][panel % columns]
        for index, target in enumerate(session.targets):
            for result in target.levels:
                if result.level.label != label or result.measured.latencies.size == 0:
                    continue
                x, y = empirical_cdf(result.measured.latencies * 1e3)
                ax.plot(x, y, color=f"C{index}", label=target.spec.name)
        ax.set_xscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("latency (ms)", fontsize=8)
        ax.set_ylabel("fraction of requests", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    for panel in range(len(labels), rows * columns):
        axes[panel // columns][panel % columns].axis("off")
    fig.suptitle(title or "Latency CDF per load level", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(session: SessionReport, directory: Path, title: str = "") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [
        plot_latency_throughput(session, directory / "latency_throughput.png", title),
        plot_latency_cdf(session, directory / "latency_cdf.png", title),
    ]
