"""Choose how a ParaGSE turns its predicted token distributions into speech, on validation speech only.

    python scripts/choose_temperature.py --checkpoint runs/demo_split_vq_paragse/checkpoint_00010500.pt \
        --valid_dir data/corpus/valid --noise_dir data/corpus/noise/train --rir_dir data/corpus/rir/train \
        --files 40 --temperatures 1.0 0.6 0.45 0.3

Degrades --files evenly spaced validation files on the fly (the training recipe's `data.degradation`, seed 0, so
the same pairs every time), enhances each with arg-max decoding and with decoding by expectation at every
temperature (inference.Enhancer), and prints mean PESQ and ESTOI per degradation and overall. Pick the temperature
here, then store it with `scripts/export_model.py --decoding expected --temperature T`; never pick it on test data.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataset as data  # noqa: E402
from inference import Enhancer  # noqa: E402
from metrics import MetricError, score_pair  # noqa: E402
from models import load_enhancer  # noqa: E402
from utils import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a ParaGSE checkpoint (training or exported)")
    p.add_argument("--valid_dir", type=Path, required=True, help="clean validation speech")
    p.add_argument("--noise_dir", type=Path, required=True)
    p.add_argument("--rir_dir", type=Path, help="room impulse responses (default: simulated)")
    p.add_argument("--files", type=int, default=40)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.6, 0.45, 0.3])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        predictor, codec = load_enhancer(args.checkpoint)
        inf = predictor.config["inference"]
        decodings = [("argmax", 1.0)] + [("expected", t) for t in args.temperatures]
        enhancers = [Enhancer(codec, predictor, torch.device("cpu"), inf["window_seconds"], inf["overlap_seconds"],
                              decoding=d, temperature=t) for d, t in decodings]
        pairs = data.DegradedDataset(args.valid_dir, args.noise_dir, args.rir_dir, predictor.config["data"], None, 0)
    except (UserError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stride = max(1, len(pairs) // args.files)
    scores: dict[str, list[list[float]]] = defaultdict(list)
    for index in range(0, stride * min(args.files, len(pairs)), stride):
        degraded, clean, description = pairs.item(index)
        row = []
        try:
            for signal in [degraded] + [enhancer(degraded).audio for enhancer in enhancers]:
                metrics = score_pair(signal, clean, codec.sample_rate, dnsmos=False)
                row += [metrics["pesq"], metrics["estoi"]]
        except MetricError as e:
            print(f"skipped validation file {index}: {e}", file=sys.stderr)
            continue
        scores[description["condition"]].append(row)
        scores["all"].append(row)
    names = ["degraded"] + [d if d == "argmax" else f"expected T={t:g}" for d, t in decodings]
    print(f"{len(scores['all'])} validation files of {args.valid_dir}, {args.checkpoint}: PESQ / ESTOI")
    print("| condition | n | " + " | ".join(names) + " |\n|---|---:|" + "---|" * len(names))
    for condition, rows in sorted(scores.items(), key=lambda item: item[0] == "all"):
        means = np.mean(rows, axis=0)
        cells = [f"{means[2 * i]:.3f} / {means[2 * i + 1]:.3f}" for i in range(len(names))]
        print(f"| {condition} | {len(rows)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
