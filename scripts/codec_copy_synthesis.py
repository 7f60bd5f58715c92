"""Score a codec's copy-synthesis of held-out speech: encode, decode, compare with the input.

    python scripts/codec_copy_synthesis.py --checkpoint pretrained/demo_codec.pt --data_dir data/corpus/test \
        --every 60 --output_dir outputs/codec_test

Takes every N-th file (sorted order) of --data_dir, writes the re-synthesised files under --output_dir/codec and
a per-file CSV, and prints the mean scores of the codec output and of the clean input itself (DNSMOS of clean
speech is the ceiling for its DNSMOS). This is the measurement behind the model card's codec table.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluate  # noqa: E402
import inference  # noqa: E402
from utils import UserError, find_audio_files  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a codec, or an enhancer carrying one")
    p.add_argument("--data_dir", type=Path, required=True, help="held-out clean speech")
    p.add_argument("--every", type=int, default=1, help="take every N-th file (default: all)")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--no_dnsmos", action="store_true", help="skip DNSMOS (the slowest metric)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="scoring processes")
    args = p.parse_args(argv)
    if args.every < 1:
        print("error: --every must be at least 1", file=sys.stderr)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
