"""How much of the blend's loss is the predicted clean level: the shipped blend given the clean log-mel, and the error
of the predicted one (docs/experiments.md item 39).

    python research/level_oracle.py --test_dir data/steady_check --condition noise --files 40

For compare_peers.py's choice of --files recordings, the enhancer (default: the shipped demo model) enhances each
degraded file three times: as shipped; with the clean recording's own log-mel in place of the predicted one (brought to
the input's level as the pipeline brings the input, everything else as shipped); and the same without the blend's trust
in tokens the model calls intact. Prints mean PESQ / ESTOI of each. Then the predicted log-mel (the one the pipeline
handed the blend in the shipped pass) against the clean one, in the bands and frames of speech (clean log-mel above
1e-4), binned by how far the predicted level lies below the degraded input's (observable at inference: a recalibration
could only use this), with the median signed error and the mean absolute error in dB. Binning by the true
clean-to-degraded ratio instead would show a large over-estimate in noisy bands that is selection (bands picked for a
low clean level), not bias.

This file lives in research/, beside the project's modules rather than inside a package, so it puts the repository
root (the parent of research/) on sys.path before importing them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: see the module docstring

import cpu_speed  # noqa: E402  (before torch: it sets the OpenMP wait policy, as in inference.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inference import Enhancer  # noqa: E402
from metrics import score_pair  # noqa: E402
from scripts.compare_peers import condition_dirs, select_files  # noqa: E402
from utils import UserError, load_audio, normalise_level, run_command  # noqa: E402

DB_PER_NEPER = 20 / np.log(10)  # the log-mel is a natural log of magnitudes
BIN_EDGES_DB = np.arange(-30, 21, 5)


class BlendLevel:
    """Stands in for the blend's band_gains: records the predicted log-mel the pipeline hands it (`predicted`), and
    hands on either that, as shipped, or the clean log-mel (`clean_log_mel`, set per file), with or without the
    model's trust in intact tokens."""

    def __init__(self, band_gains, clean: bool, trust: bool = True):
        self.band_gains, self.clean, self.trust = band_gains, clean, trust
        self.clean_log_mel: torch.Tensor | None = None
        self.predicted: torch.Tensor | None = None

    def __call__(self, predicted_log_mel: torch.Tensor, analysis: tuple, intact: torch.Tensor):
        self.predicted = predicted_log_mel
        level = self.clean_log_mel[..., :predicted_log_mel.shape[-1]] if self.clean else predicted_log_mel
        return self.band_gains(level, analysis, intact if self.trust else torch.zeros_like(intact))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test_dir", type=Path, required=True, help="as prepare_data.py testsets writes it")
    p.add_argument("--condition", default="noise")
    p.add_argument("--checkpoint", type=Path, help="enhancer (default: the shipped demo model)")
    p.add_argument("--files", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    def run() -> int:
        torch.set_num_threads(args.threads)
        conditions = condition_dirs(args.test_dir)
        if args.condition not in conditions:
            raise UserError(f"{args.test_dir} has no condition {args.condition!r} ({', '.join(conditions)})")
        files = select_files(args.test_dir / "clean", conditions, args.files, 1.5)
        enhancer = Enhancer.load(args.checkpoint, device="cpu").parallelize()
        if enhancer.blend is None:
            raise UserError("the checkpoint has no inference.blend: nothing to measure")
        codec, shipped_gains = enhancer.codec, enhancer.blend.band_gains
        blends = {"the predicted log-mel (as shipped)": BlendLevel(shipped_gains, clean=False),
                  "the clean log-mel": BlendLevel(shipped_gains, clean=True),
                  "the clean log-mel, no trust in intact tokens": BlendLevel(shipped_gains, clean=True, trust=False)}
        shipped = blends["the predicted log-mel (as shipped)"]
        scores: dict[str, list] = {name: [] for name in blends}
        errors, offsets = [], []
        for rel in files:
            degraded, _ = load_audio(conditions[args.condition] / rel, enhancer.sample_rate)
            clean, _ = load_audio(args.test_dir / "clean" / rel, enhancer.sample_rate)
            n = min(degraded.size, clean.size)
            degraded, clean = degraded[:n], clean[:n]
            if n > enhancer.window:  # windowed, the blend is called once per window, on that window's frames only
                raise UserError(f"{conditions[args.condition] / rel}: {n / enhancer.sample_rate:.1f} s is longer than "
                                f"one inference window; the oracle compares whole recordings' log-mels")
            wav, gain = normalise_level(torch.from_numpy(degraded)[None], enhancer.input_level_db,
                                        enhancer.sample_rate)
            with torch.inference_mode():
                clean_log_mel = codec.log_mel(codec.pad(torch.from_numpy(clean)[None] * gain))
                degraded_log_mel = codec.log_mel(codec.pad(wav))
            for name, blend in blends.items():
                blend.clean_log_mel = clean_log_mel
                enhancer.blend.band_gains = blend
                try:
                    result = score_pair(enhancer.enhance(degraded).audio, clean, enhancer.sample_rate, dnsmos=False)
                finally:
                    enhancer.blend.band_gains = shipped_gains
                scores[name].append((result["pesq"], result["estoi"]))
            speech = clean_log_mel > np.log(1e-4)
            errors.append((DB_PER_NEPER * (shipped.predicted - clean_log_mel))[speech].numpy())
            offsets.append((DB_PER_NEPER * (shipped.predicted - degraded_log_mel))[speech].numpy())
        print(f"{len(files)} recordings of {args.test_dir}/{args.condition}, PESQ / ESTOI:")
        for name, values in scores.items():
            pesq, estoi = np.nanmean(np.array(values, dtype=float), axis=0)
            print(f"  the blend given {name}: {pesq:.3f} / {estoi:.3f}")
        error, offset = np.concatenate(errors), np.concatenate(offsets)
        print("predicted minus clean level (dB) in bands and frames of speech, by predicted minus degraded level:")
        which = np.digitize(offset, BIN_EDGES_DB)
        for k in range(len(BIN_EDGES_DB) + 1):
            chosen = error[which == k]
            if chosen.size:
                low = "-inf" if k == 0 else f"{BIN_EDGES_DB[k - 1]:+d}"
                high = "+inf" if k == len(BIN_EDGES_DB) else f"{BIN_EDGES_DB[k]:+d}"
                print(f"  [{low:>4}, {high:>4}) dB: {chosen.size:8d} points, median {np.median(chosen):+5.1f}, "
                      f"mean absolute {np.abs(chosen).mean():4.1f}")
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
