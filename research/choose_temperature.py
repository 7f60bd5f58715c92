"""Choose how a ParaGSE turns its predicted token distributions into speech, on validation speech only.

    python research/choose_temperature.py --checkpoint runs/demo_paragse/checkpoint_00020000.pt \
        --valid_dir data/corpus/valid --noise_dir data/corpus/noise/train --rir_dir data/corpus/rir/train \
        --files 40 --temperatures 1.0 0.8 0.6 0.45 0.3

Degrades --files evenly spaced validation files on the fly (the training recipe's `data.degradation`, seed 0, so
the same pairs every time), enhances each with arg-max decoding and with decoding by expectation at every
temperature (inference.Enhancer with decoding "expected" and that temperature), and prints mean PESQ and ESTOI per
degradation and overall. Pick the temperature here, then store it with
`python checkpoint.py export CHECKPOINT OUT --decoding expected --temperature T`; never pick it on test data.

The recipe: a training checkpoint carries its run's config (under "training"), whose `data` section is used; an
exported one carries none, so the project's defaults (config.json's `data`) are used, and a line says so.

This file lives in research/, beside the project's modules rather than inside a package, so it puts the repository
root (the parent of research/) on sys.path before importing them.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: see the module docstring

import cpu_speed  # noqa: E402  (before torch: it sets the OpenMP wait policy, as in inference.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoint  # noqa: E402
import dataset as data  # noqa: E402
from inference import Enhancer  # noqa: E402
from metrics import MetricError, score_pair  # noqa: E402
from utils import UserError, load_config, run_command  # noqa: E402


def recipe_data(path: Path) -> tuple[dict, str]:
    """(the `data` config section the checkpoint's predictor was trained with, where it came from)."""
    payload = checkpoint.load(path, "enhancer")
    run_config = (payload.get("training") or {}).get("config")
    if run_config is not None:
        return run_config["data"], "the checkpoint's training config"
    return load_config()["data"], "config.json (an exported checkpoint keeps no training config)"


def build_enhancers(path: Path, temperatures: list[float]) -> tuple[list[tuple[str, float]], list[Enhancer]]:
    """One Enhancer per decoding, all sharing one loaded predictor and codec: arg-max, then expectation at each T."""
    predictor, codec, defaults = checkpoint.load_enhancer(path)
    decodings = [("argmax", 1.0)] + [("expected", t) for t in temperatures]
    enhancers = [Enhancer(codec, predictor, torch.device("cpu"), defaults["window_seconds"],
                          defaults["overlap_seconds"], decoding=d, temperature=t,
                          input_level_db=defaults["input_level_db"]) for d, t in decodings]
    return decodings, enhancers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a ParaGSE checkpoint (training or exported)")
    p.add_argument("--valid_dir", type=Path, required=True, help="clean validation speech")
    p.add_argument("--noise_dir", type=Path, required=True)
    p.add_argument("--rir_dir", type=Path, help="room impulse responses (default: simulated)")
    p.add_argument("--files", type=int, default=40)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.6, 0.45, 0.3])
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.files < 1:
        raise UserError("--files must be at least 1")
    torch.set_num_threads(1)
    config_data, source = recipe_data(args.checkpoint)
    decodings, enhancers = build_enhancers(args.checkpoint, args.temperatures)
    sample_rate = enhancers[0].sample_rate
    try:
        pairs = data.DegradedDataset(args.valid_dir, args.noise_dir, args.rir_dir, config_data, None, 0, sample_rate)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None
    print(f"degradation recipe from {source}", file=sys.stderr)
    stride = max(1, len(pairs) // args.files)
    scores: dict[str, list[list[float]]] = defaultdict(list)
    for index in range(0, stride * min(args.files, len(pairs)), stride):
        degraded, clean, description = pairs.item(index)
        row = []
        try:
            for signal in [degraded] + [enhancer.enhance(degraded).audio for enhancer in enhancers]:
                metrics = score_pair(signal, clean, sample_rate, dnsmos=False)
                row += [metrics["pesq"], metrics["estoi"]]
        except MetricError as e:
            print(f"skipped validation file {index}: {e}", file=sys.stderr)
            continue
        scores[description["condition"]].append(row)
        scores["all"].append(row)
    if not scores:
        raise UserError(f"none of the validation files of {args.valid_dir} could be scored")
    names = ["degraded"] + [d if d == "argmax" else f"expected T={t:g}" for d, t in decodings]
    print(f"{len(scores['all'])} validation files of {args.valid_dir}, {args.checkpoint}: PESQ / ESTOI")
    print("| condition | n | " + " | ".join(names) + " |\n|---|---:|" + "---|" * len(names))
    for condition, rows in sorted(scores.items(), key=lambda item: item[0] == "all"):
        means = np.mean(rows, axis=0)
        cells = [f"{means[2 * i]:.3f} / {means[2 * i + 1]:.3f}" for i in range(len(names))]
        print(f"| {condition} | {len(rows)} | " + " | ".join(cells) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu_speed.enable()  # the allocator policy of the project's command-line tools
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
