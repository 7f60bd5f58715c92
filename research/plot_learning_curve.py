"""Plot held-out validation scores of training runs against compute hours, from their log.csv files.

    python research/plot_learning_curve.py training/demo_codec/log.csv figures/demo_codec_learning_curve.png \
        --more training/demo_codec/test_log.csv --labels "demo codec" "demo codec"
    python research/plot_learning_curve.py training/demo_paragse/stage1_log.csv \
        figures/demo_paragse_learning_curve.png --more training/demo_paragse/log.csv \
        --labels "ParaGSE, first 10,500 steps (previous codec)" "ParaGSE on the demo codec" \
        --title "ParaGSE validation during training"

A log.csv (runs.RunLog) has columns step, compute_hours, key, value. Several logs share the axes: a run started
with --init_from carries its parent's compute hours, so it continues the curve from the point it branched off (the
demo ParaGSE's log.csv continues its stage1_log.csv). Scores of the held-out test split, logged at checkpoints by
`research/codec_copy_synthesis.py --log_csv` (keys test/...), are drawn dashed beside the validation split's (keys
valid/...); give a test log the same label as its run to draw both in the run's colour.

This file lives in research/, beside the project's modules rather than inside a package, so it puts the repository
root (the parent of research/) on sys.path before importing them (utils: the atomic writer and the one
command-line error path).
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: see the module docstring

from matplotlib import colormaps  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from utils import UserError, atomic_write, run_command  # noqa: E402

PANELS = [("pesq", "PESQ (wide-band)"), ("estoi", "ESTOI"), ("dnsmos_ovrl", "DNSMOS OVRL"),
          ("mel_l1", "log-mel L1"), ("mdct_correlation_below_1khz", "MDCT correlation < 1 kHz (phase)"),
          ("accuracy", "token accuracy")]
SPLITS = {"valid": ("valid split", "-", "o"), "test": ("held-out test split", "--", "s")}  # label, line, marker
LOG_COLUMNS = ("step", "compute_hours", "key", "value")

Series = dict[str, list[tuple[float, int, float]]]


def read_log(path: Path) -> Series:
    """key -> [(compute_hours, step, value)], in log order (a resumed run appends after the last point)."""
    series: Series = defaultdict(list)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not set(LOG_COLUMNS) <= set(reader.fieldnames or ()):
            raise UserError(f"{path} is not a training log (needs columns {', '.join(LOG_COLUMNS)})")
        for line, row in enumerate(reader, start=2):
            try:
                series[row["key"]].append((float(row["compute_hours"]), int(row["step"]), float(row["value"])))
            except (TypeError, ValueError):
                raise UserError(f"{path} line {line}: not a step, compute hours and value") from None
    return series


def plot(runs: list[tuple[str, Series]], out: Path, title: str) -> Path:
    """runs: [(label, series of read_log)], drawn over each other; runs with one label share a colour."""
    panels = [(metric, label) for metric, label in PANELS
              if any(series.get(f"{split}/{metric}") for _, series in runs for split in SPLITS)]
    if not panels:
        raise UserError("the logs have no validation or test scores yet (valid/... or test/... keys)")
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(4.6 * columns, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    names = list(dict.fromkeys(label for label, _ in runs))
    palette = [f"C{i}" for i in range(10)] if len(names) <= 10 else [colormaps["tab20"](i) for i in range(20)]
    colours = {label: palette[i % len(palette)] for i, label in enumerate(names)}  # one per run
    splits_drawn = {split for _, series in runs for split in SPLITS if any(k.startswith(f"{split}/") for k in series)}
    for i, (metric, label) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        for split, (split_label, line, marker) in SPLITS.items():
            drawn = [(run_label, series[f"{split}/{metric}"]) for run_label, series in runs
                     if series.get(f"{split}/{metric}")]
            for n, (run_label, points) in enumerate(drawn):
                hours, steps, values = zip(*points)
                ax.plot(hours, values, line, marker=marker, markersize=3, color=colours[run_label],
                        label=f"{run_label}, {split_label}" if len(splits_drawn) > 1 else run_label)
                if n == len(drawn) - 1:  # only the newest run's last point: many legs' labels would overlap
                    ax.annotate(f"step {steps[-1]}: {values[-1]:.3g}", (hours[-1], values[-1]), fontsize=8,
                                xytext=(-10, 8), textcoords="offset points", ha="right")
        ax.set_xlabel("compute hours (CPU core-hours)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    if len(runs) > 1 or len(splits_drawn) > 1:
        handles, labels = fig.axes[0].get_legend_handles_labels()
        if rows * columns > len(panels):  # a free panel slot holds the legend, clear of the curves
            spare = fig.add_subplot(rows, columns, len(panels) + 1)
            spare.axis("off")
            spare.legend(handles, labels, fontsize=8, loc="upper left")
        else:
            fig.axes[0].legend(fontsize=8)
    fig.suptitle(title)
    # Atomically: a crash never leaves half a figure under the real name (the format is named: the temporary
    # file's suffix is not .png).
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log_csv", type=Path)
    p.add_argument("output_png", type=Path)
    p.add_argument("--more", type=Path, nargs="*", default=[], help="further log.csv files drawn on the same axes")
    p.add_argument("--labels", nargs="*", help="one label per log (default: the log's folder name)")
    p.add_argument("--title", default="held-out copy-synthesis during training")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    logs = [args.log_csv, *args.more]
    labels = args.labels or [log.parent.name for log in logs]
    if len(labels) != len(logs):
        raise UserError(f"{len(logs)} logs but {len(labels)} labels")
    for log in logs:
        if not log.is_file():
            raise UserError(f"log not found: {log}")
    print(plot([(label, read_log(log)) for label, log in zip(labels, logs)], args.output_png, args.title))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
