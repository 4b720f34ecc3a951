"""PNG plots of the benchmark JSON, on any machine with matplotlib (`pip install -e .[bench]`):

    python benchmarks/plot.py serving results/2025-01-01-nvidia-h200    # serving.json  -> serving.png
    python benchmarks/plot.py accuracy DIR                              # accuracy.json -> accuracy.png
    python benchmarks/plot.py knob DIR                                  # knob.json     -> knob.png (sweep)
    python benchmarks/plot.py compression DIR                           # compression.json -> compression.png
    python benchmarks/plot.py compression_speed DIR                     # compression_speed.json -> .png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install -e .[bench]") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _load(path: Path) -> dict:
    if not path.exists():
        raise SystemExit(f"{path} does not exist (run the benchmark first, or pass the folder that holds it)")
    return json.loads(path.read_text())


def _grouped_bars(ax: Any, groups: list[str], series: list[str], values: dict, ylabel: str) -> None:
    width = 0.8 / max(len(series), 1)
    for i, name in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get((group, name)) for group in groups]
        bars = ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width, label=name)
        ax.bar_label(bars, fmt="%.0f" if max((y for y in ys if y is not None), default=0) >= 10 else "%.2f",
                     fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.12)  # room for the bar labels


def plot_serving(run_dir: str | Path) -> Path:
    """serving.json -> serving.png: TTFT p50 (left) and request throughput (right) per preset and
    concurrency, one bar per server."""
    run_dir = Path(run_dir)
    data = _load(run_dir / "serving.json")
    rows = [r for r in data["rows"] if "error" not in r]
    if not rows:
        raise SystemExit(f"{run_dir / 'serving.json'} has no successful runs to plot")
    groups = list(dict.fromkeys(map(_run_group, rows)))
    series = list(dict.fromkeys(r["server"] for r in rows))
    ttft = {(_run_group(r), r["server"]): r["ttft_p50_ms"] for r in rows}
    rps = {(_run_group(r), r["server"]): r["req_per_s"] for r in rows}
    meta = data.get("meta", {})
    return _two_panels(groups, series, (ttft, "TTFT p50 (ms)", "time to first token, median (lower is better)"),
                       (rps, "requests / s", "throughput (higher is better)"),
                       f"stock SGLang vs vlcache — {meta.get('gpu', '?')}, {meta.get('date', '?')}",
                       run_dir / "serving.png")


def _run_group(row: dict) -> str:
    """A bar group: one preset at one concurrency."""
    return f"{row['preset']}\nconc {row['concurrency']}"


def _two_panels(groups: list[str], series: list[str], left_panel: tuple[dict, str, str],
                right_panel: tuple[dict, str, str], title: str, out: Path) -> Path:
    """Two grouped bar charts side by side ((values, y label, title) each), one legend, written to out."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(5 + 1.6 * len(groups), 4.2))
    for ax, (values, ylabel, panel_title) in zip(axes, (left_panel, right_panel)):
        _grouped_bars(ax, groups, series, values, ylabel)
        ax.set_title(panel_title, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=len(series), fontsize=8,
               bbox_to_anchor=(0.5, 0.93))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_accuracy(run_dir: str | Path) -> Path:
    """accuracy.json -> accuracy.png: accuracy against the measured recomputed fraction, one line per
    policy (its parameters are the points), the stock server as a dashed level. The y value is
    meta.plot_y (the sweep: accuracy on repeats), else accuracy."""
    run_dir = Path(run_dir)
    data = _load(run_dir / "accuracy.json")
    y_key = data.get("meta", {}).get("plot_y", "accuracy")
    lines: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    levels: list[tuple[str, float]] = []
    for s in data["summary"]:
        if s.get(y_key) is None:
            continue
        if s["policy"] == "stock" or s.get("recomputed_fraction") is None:
            levels.append((s["server"], s[y_key]))  # nothing reused: no x position
        else:
            lines[s["policy"]].append((s["recomputed_fraction"], s[y_key], s["server"]))
    if not lines and not levels:
        raise SystemExit(f"{run_dir / 'accuracy.json'} has no server with an accuracy to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for policy, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
        for x, y, label in points:
            ax.annotate(label.partition(":")[2], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for i, (label, acc) in enumerate(levels):
        ax.axhline(acc, linestyle="--", color=f"C{len(lines) + i}", label=f"{label} (no reuse)")
    ax.set_xlabel("recomputed fraction of reused image tokens (measured)")
    ax.set_ylabel("accuracy on repeats (exact match)" if y_key == "repeat_accuracy" else "accuracy (exact match)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(f"accuracy vs recompute — {data.get('meta', {}).get('dataset', '')}", fontsize=9)
    fig.tight_layout()
    out = run_dir / "accuracy.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_knob(run_dir: str | Path) -> Path:
    """knob.json (accuracy.py sweep) -> knob.png: accuracy on repeats against the share of records
    whose question comes before the image (0 = regime B, 1 = regime A), one line per config."""
    run_dir = Path(run_dir)
    data = _load(run_dir / "knob.json")
    shares = [(name, share) for name, share in data.get("shares", [])]
    series = {label: [(share, values.get(name)) for name, share in shares if values.get(name) is not None]
              for label, values in data.get("rows", {}).items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        raise SystemExit(f"{run_dir / 'knob.json'} has no config with an accuracy to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                linestyle="--" if label in ("full", "none") else "-")
    ax.set_xlabel("share of records with the question before the image (0: regime B, 1: regime A)")
    ax.set_ylabel("accuracy on repeats (exact match)")
    return _save_unit_plot(plt, fig, ax, "accuracy along the A-B knob", run_dir / "knob.png")


def _save_unit_plot(plt: Any, fig: Any, ax: Any, title: str, out: Path) -> Path:
    """A plot whose y axis is a share in [0, 1]: limits, legend, title, written to `out`."""
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_compression(run_dir: str | Path) -> Path:
    """compression.json (compression_accuracy.py) -> compression.png: accuracy and token agreement with
    the uncompressed answers against alpha, per server (budget method)."""
    run_dir = Path(run_dir)
    rows = [r for r in _load(run_dir / "compression.json").get("rows", []) if r.get("accuracy") is not None]
    if not rows:
        raise SystemExit(f"{run_dir / 'compression.json'} has no row with an accuracy to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label in dict.fromkeys(r["server"] for r in rows):
        pts = sorted((r["alpha"], r) for r in rows if r["server"] == label)
        xs = [a for a, _ in pts]
        ax.plot(xs, [r["accuracy"] for _, r in pts], marker="o", label=f"{label}: accuracy")
        ax.plot(xs, [r.get("token_agree_uncompressed") for _, r in pts], marker="x", linestyle="--",
                label=f"{label}: token agreement with α = 1")
    ax.set_xscale("log")
    ax.set_xlabel("α, share of the prompt KV kept")
    return _save_unit_plot(plt, fig, ax, "VL-Cache compression on the row task (tiny Qwen2.5-VL)",
                           run_dir / "compression.png")


def plot_compression_speed(run_dir: str | Path) -> Path:
    """compression_speed.json (compression_speed.py) -> compression_speed.png: decode tokens/s per
    request (left) and E2E latency p50 (right) per preset and concurrency, one bar per server/α."""
    run_dir = Path(run_dir)
    data = _load(run_dir / "compression_speed.json")
    rows = [r for r in data.get("speed", []) if "error" not in r and r.get("decode_tok_per_s")]
    if not rows:
        raise SystemExit(f"{run_dir / 'compression_speed.json'} has no successful run to plot")
    groups = list(dict.fromkeys(map(_run_group, rows)))
    series = list(dict.fromkeys(r["server"] for r in rows))
    meta = data.get("meta", {})
    return _two_panels(groups, series,
                       ({(_run_group(r), r["server"]): r["decode_tok_per_s"] for r in rows},
                        "decode tokens / s per request", "decode speed, 1000 / median ITL (higher is better)"),
                       ({(_run_group(r), r["server"]): r["e2e_p50_ms"] for r in rows},
                        "E2E latency p50 (ms)", "end-to-end latency, median (lower is better)"),
                       f"VL-Cache compression — {meta.get('gpu', '?')}, {meta.get('date', '?')}",
                       run_dir / "compression_speed.png")


PLOTS = {"serving": plot_serving, "accuracy": plot_accuracy, "knob": plot_knob, "compression": plot_compression,
         "compression_speed": plot_compression_speed}


def try_plot(kind: str, run_dir: str | Path) -> None:
    """At the end of a benchmark run: the plot, or why not and how to make it later (never fails the run)."""
    try:
        print(f"wrote {PLOTS[kind](run_dir)}")
    except SystemExit as e:  # no matplotlib here, or nothing to plot: the table still follows
        print(f"{e}; plot later with `python benchmarks/plot.py {kind} {run_dir}`")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=list(PLOTS))
    p.add_argument("dir", help="folder holding serving.json, accuracy.json, knob.json, compression.json or compression_speed.json")
    args = p.parse_args(argv)
    print(f"wrote {PLOTS[args.kind](args.dir)}")


if __name__ == "__main__":
    main()
