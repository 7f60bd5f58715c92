"""Plot held-out validation scores of a training run against compute hours, from its log.csv.

    python scripts/plot_learning_curve.py training/demo_codec/log.csv figures/demo_codec_learning_curve.png
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PANELS = [("valid/pesq", "PESQ (wide-band)"), ("valid/estoi", "ESTOI"), ("valid/dnsmos_ovrl", "DNSMOS OVRL"),
          ("valid/mel_l1", "log-mel L1"), ("valid/mdct_correlation_below_1khz", "MDCT correlation < 1 kHz (phase)"),
          ("valid/accuracy", "token accuracy")]


def read_log(path: Path) -> dict[str, list[tuple[float, int, float]]]:
    """key -> [(compute_hours, step, value)], in log order (a resumed run appends after the last point)."""
    series: dict[str, list[tuple[float, int, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            series[row["key"]].append((float(row["compute_hours"]), int(row["step"]), float(row["value"])))
    return series


def plot(series: dict, out: Path, title: str) -> Path:
    panels = [(key, label) for key, label in PANELS if series.get(key)]
    if not panels:
        raise SystemExit("error: the log has no validation scores yet (valid/... keys)")
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        hours, steps, values = zip(*series[key])
        ax.plot(hours, values, marker="o", markersize=3)
        ax.set_xlabel("compute hours (CPU core-hours)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.annotate(f"step {steps[-1]}: {values[-1]:.3g}", (hours[-1], values[-1]), fontsize=8,
                    xytext=(-10, 8), textcoords="offset points", ha="right")
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log_csv", type=Path)
    p.add_argument("output_png", type=Path)
    p.add_argument("--title", default="held-out copy-synthesis during training")
    args = p.parse_args(argv)
    if not args.log_csv.is_file():
        print(f"error: log not found: {args.log_csv}", file=sys.stderr)
        return 2
    print(plot(read_log(args.log_csv), args.output_png, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
