"""Score a codec's copy-synthesis of held-out speech: encode, decode, compare with the input.

    python research/codec_copy_synthesis.py --checkpoint pretrained/demo_codec.pt --data_dir data/corpus/test \
        --every 60 --output_dir outputs/codec_test

Takes every N-th file (sorted order) of --data_dir, writes the re-synthesised files under --output_dir/codec and
a per-file CSV, and prints the mean scores of the codec output and of the clean input itself (DNSMOS of clean
speech is the ceiling for its DNSMOS). This is the measurement behind the model card's codec table.

With --log_csv and a codec checkpoint, the means are also written to a learning-curve log (the format of a run's
log.csv: columns step, compute_hours, key, value; keys test/pesq, test/estoi, test/dnsmos_ovrl) at the checkpoint's
step and compute hours, replacing any earlier point at that step; `research/plot_learning_curve.py` draws them
beside the run's validation curve:

    python research/codec_copy_synthesis.py --checkpoint runs/demo_codec/checkpoint_00006000.pt \
        --data_dir data/corpus/test --every 60 --output_dir outputs/codec_test \
        --log_csv training/demo_codec/test_log.csv

A training checkpoint keeps its step and compute seconds under "training", an exported one under "history"
(checkpoint.py); either can be logged.

This file lives in research/, beside the project's modules rather than inside a package, so it puts the repository
root (the parent of research/) on sys.path before importing them.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: see the module docstring

import cpu_speed  # noqa: E402,F401  (before torch: it sets the OpenMP wait policy, as in inference.py)

import numpy as np  # noqa: E402

import checkpoint  # noqa: E402
import evaluate  # noqa: E402
import inference  # noqa: E402
from utils import UserError, atomic_write, find_audio_files, run_command  # noqa: E402

CURVE_METRICS = ("pesq", "estoi", "dnsmos_ovrl")
LOG_COLUMNS = ("step", "compute_hours", "key", "value")  # runs.RunLog's log.csv


def checkpoint_position(path: Path, kind: str = "codec") -> tuple[int, float]:
    """(step, compute hours) of a checkpoint of `kind`: under "training" in a training one, "history" in an export."""
    payload = checkpoint.load(path, kind)
    for section in ("training", "history"):
        record = payload.get(section) or {}
        if "step" in record and "compute_seconds" in record:
            return int(record["step"]), float(record["compute_seconds"]) / 3600
    raise UserError(f"{path}: --log_csv needs a checkpoint that records its step and compute seconds (under "
                    "'training' or 'history'); this one records neither")


def append_curve_point(log_csv: Path, step: int, hours: float, rows: list[dict]) -> list[dict]:
    """Write the mean scores of `rows` at `step` to `log_csv` (atomically, in compute-hour order), replacing the
    earlier points of the same step and hours; returns the new points. A point is known by both: a run continued
    with --init_from counts its steps from 0 again, so one step number can mark several points of a curve."""
    kept = []
    if log_csv.exists():
        with open(log_csv, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != LOG_COLUMNS:
                raise UserError(f"{log_csv} is not a learning-curve log (columns {', '.join(LOG_COLUMNS)})")
            kept = [r for r in reader if (int(r["step"]), r["compute_hours"]) != (step, f"{hours:.4f}")]
    scored = [r for r in rows if not r.get("error")]
    new = [{"step": step, "compute_hours": f"{hours:.4f}", "key": f"test/{metric}",
            "value": f"{np.mean([float(r[metric]) for r in scored]):.6g}"}
           for metric in CURVE_METRICS if scored and all(r.get(metric) not in (None, "") for r in scored)]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LOG_COLUMNS)  # csv's \r\n, as runs.RunLog and the committed logs
    writer.writeheader()
    writer.writerows(sorted(kept + new, key=lambda r: (float(r["compute_hours"]), int(r["step"]), r["key"])))
    atomic_write(log_csv, text.getvalue().encode())
    return new


def link_selection(data_dir: Path, files: list[Path], chosen: Path) -> None:
    """Symbolic links to the chosen files, so the selection is an ordinary folder for inference and scoring."""
    for f in files:
        link = chosen / f
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to((data_dir / f).resolve())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a codec, or an enhancer carrying one")
    p.add_argument("--data_dir", type=Path, required=True, help="held-out clean speech")
    p.add_argument("--every", type=int, default=1, help="take every N-th file (default: all)")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--no_dnsmos", action="store_true", help="skip DNSMOS (the slowest metric)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="scoring processes")
    p.add_argument("--log_csv", type=Path, help="also log the mean scores at a codec checkpoint's step here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.every < 1:
        raise UserError("--every must be at least 1")
    # Before the slow part: a checkpoint that cannot be logged is refused at once.
    position = checkpoint_position(args.checkpoint) if args.log_csv else None
    files = find_audio_files(args.data_dir)[:: args.every] if args.data_dir.is_dir() else []
    if not files:
        raise UserError(f"no audio files under {args.data_dir}")
    chosen = args.output_dir / "clean"
    link_selection(args.data_dir, files, chosen)
    code = inference.main(["--input_dir", str(chosen), "--output_dir", str(args.output_dir / "codec"), "--checkpoint",
                           str(args.checkpoint), "--codec_only", "--overwrite", "--device", "cpu"])
    if code != 0:
        return code
    rows = evaluate.evaluate_dirs(args.output_dir / "codec", chosen, chosen, workers=args.workers,
                                  dnsmos=not args.no_dnsmos)
    evaluate.write_csv(rows, args.output_dir / "scores.csv")
    print(f"{len(files)} files of {args.data_dir}, codec {args.checkpoint} (degraded column = the clean input):")
    print(evaluate.summarise(rows))
    if position is not None:
        step, hours = position
        new = append_curve_point(args.log_csv, step, hours, rows)
        print(f"step {step} ({hours:.4f} compute hours): {len(new)} test points logged to {args.log_csv}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(parse_args(argv)))  # inference.main sets up the CPU policy itself


if __name__ == "__main__":
    sys.exit(main())
