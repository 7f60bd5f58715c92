"""Score a codec's copy-synthesis of held-out speech: encode, decode, compare with the input.

    python scripts/codec_copy_synthesis.py --checkpoint pretrained/demo_codec.pt --data_dir data/corpus/test \
        --every 60 --output_dir outputs/codec_test

Takes every N-th file (sorted order) of --data_dir, writes the re-synthesised files under --output_dir/codec and
a per-file CSV, and prints the mean scores of the codec output and of the clean input itself (DNSMOS of clean
speech is the ceiling for its DNSMOS). This is the measurement behind the model card's codec table.

With --log_csv and a training checkpoint, the means are also written to a learning-curve log (the format of a run's
log.csv, keys test/pesq, test/estoi, test/dnsmos_ovrl) at the checkpoint's step and compute hours, replacing any
earlier point at that step; `scripts/plot_learning_curve.py` draws them beside the run's validation curve:

    python scripts/codec_copy_synthesis.py --checkpoint training/demo_split_vq_codec/checkpoint_00012000.pt \
        --data_dir data/corpus/test --every 60 --output_dir outputs/codec_test \
        --log_csv training/demo_split_vq_codec/test_log.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluate  # noqa: E402
import inference  # noqa: E402
from utils import UserError, find_audio_files, load_checkpoint  # noqa: E402

CURVE_METRICS = ("pesq", "estoi", "dnsmos_ovrl")


def append_curve_point(log_csv: Path, checkpoint: dict, rows: list[dict]) -> None:
    """Write the mean scores of `rows` at the training checkpoint's step to `log_csv` (atomically, sorted by step)."""
    step, hours = checkpoint["step"], checkpoint["compute_seconds"] / 3600
    kept = []
    if log_csv.exists():
        with open(log_csv, newline="") as f:
            kept = [r for r in csv.DictReader(f) if int(r["step"]) != step]
    scored = [r for r in rows if not r.get("error")]
    new = [{"step": step, "compute_hours": f"{hours:.4f}", "key": f"test/{metric}",
            "value": f"{np.mean([float(r[metric]) for r in scored]):.6g}"}
           for metric in CURVE_METRICS if scored and all(r.get(metric) not in (None, "") for r in scored)]
    log_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = log_csv.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "compute_hours", "key", "value"])
        writer.writeheader()
        writer.writerows(sorted(kept + new, key=lambda r: (int(r["step"]), r["key"])))
    tmp.replace(log_csv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a codec, or an enhancer carrying one")
    p.add_argument("--data_dir", type=Path, required=True, help="held-out clean speech")
    p.add_argument("--every", type=int, default=1, help="take every N-th file (default: all)")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--no_dnsmos", action="store_true", help="skip DNSMOS (the slowest metric)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="scoring processes")
    p.add_argument("--log_csv", type=Path, help="also log the mean scores at a training checkpoint's step here")
    args = p.parse_args(argv)
    if args.every < 1:
        print("error: --every must be at least 1", file=sys.stderr)
        return 2
    training_checkpoint = None
    if args.log_csv:
        try:
            training_checkpoint = load_checkpoint(args.checkpoint, "codec")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if "step" not in training_checkpoint:
            print(f"error: {args.checkpoint}: --log_csv needs a training checkpoint (it has no step and compute "
                  "hours; exported models do not)", file=sys.stderr)
            return 2
    files = find_audio_files(args.data_dir)[:: args.every] if args.data_dir.is_dir() else []
    if not files:
        print(f"error: no audio files under {args.data_dir}", file=sys.stderr)
        return 2
    chosen = args.output_dir / "clean"
    for f in files:  # links, so the selection is an ordinary folder for inference and scoring
        link = chosen / f
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to((args.data_dir / f).resolve())
    code = inference.main(["--input_dir", str(chosen), "--output_dir", str(args.output_dir / "codec"), "--checkpoint",
                           str(args.checkpoint), "--codec_only", "--overwrite", "--device", "cpu"])
    if code != 0:
        return code
    dnsmos = not args.no_dnsmos
    try:
        rows = evaluate.evaluate_dirs(args.output_dir / "codec", chosen, chosen, workers=args.workers, dnsmos=dnsmos)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    evaluate.write_csv(rows, args.output_dir / "scores.csv")
    print(f"{len(files)} files of {args.data_dir}, codec {args.checkpoint} (degraded column = the clean input):")
    print(evaluate.summarise(rows))
    if training_checkpoint is not None:
        append_curve_point(args.log_csv, training_checkpoint, rows)
        print(f"step {training_checkpoint['step']} logged to {args.log_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
