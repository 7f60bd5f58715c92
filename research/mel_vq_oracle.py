"""What a bitrate can carry before any training: split VQ of the 50 Hz log-mel, then Griffin-Lim, scored by ESTOI.

    python research/mel_vq_oracle.py --train_dir data/corpus/train --test_dir data/corpus/test --every 120 \
        --train_files 600 --codebooks 8x256 16x256 8x1024 16x1024

The log-mel of the demo codec (`codec.mel` of --config, default configs/demo_codec.json) is averaged over each
token frame (`codec.downsample` log-mel frames, 20 ms), each frame's bands are split into G contiguous groups and
every group is replaced by the nearest of K k-means centroids fitted on --train_files training files (G x log2(K)
bits per frame, the same count as G streams of K tokens). The frames are interpolated back to the log-mel rate and
turned into a waveform by the config's Griffin-Lim (`codec.griffin_lim`). The first row ("none") skips the
quantisation: what the 50 Hz frame rate alone leaves of the intelligibility. A trained codec should beat its row;
it is the bar, not a ceiling.

Why the settings come from a MelCodec config rather than from numbers here: the oracle is the bar for that codec,
so its analysis (STFT, mel bands, log floor), token rate and Griffin-Lim must be the codec's own.

This file lives in research/, beside the project's modules rather than inside a package, so it puts the repository
root (the parent of research/) on sys.path before importing them.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: see the module docstring

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pystoi import stoi  # noqa: E402
from sklearn.cluster import MiniBatchKMeans  # noqa: E402

from models.griffin_lim import MelGriffinLim  # noqa: E402
from models.log_mel import LogMel  # noqa: E402
from utils import REPO_ROOT, UserError, find_audio_files, load_audio, load_config, run_command  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo_codec.json"


def mel_settings(config: dict) -> tuple[LogMel, MelGriffinLim, int]:
    """(log-mel analysis, Griffin-Lim, log-mel frames per token frame) of a config's MelCodec section."""
    codec = config["codec"]
    if not all(key in codec for key in ("mel", "downsample", "griffin_lim")):
        raise UserError(f"the config's codec class is {codec.get('class')}, not MelCodec: it has no codec.mel, "
                        "codec.downsample and codec.griffin_lim to take the log-mel and Griffin-Lim from")
    mel = codec["mel"]
    log_mel = LogMel(config["sample_rate"], **mel)
    # The filterbank that made the log-mel inverts it, exactly as in models.mel_codec.MelCodec.
    griffin_lim = MelGriffinLim(log_mel.filters, mel["hop_length"], mel["win_length"], **codec["griffin_lim"])
    return log_mel, griffin_lim, codec["downsample"]


def frame_log_mel(log_mel: LogMel, wav: np.ndarray, downsample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """wav (samples,) -> (log-mel (1, bands, frames), its token-frame means (1, bands, frames // downsample))."""
    full = log_mel(torch.from_numpy(wav).float()[None])
    usable = full.shape[-1] // downsample * downsample
    bands = full.shape[1]
    return full, full[..., :usable].reshape(1, bands, usable // downsample, downsample).mean(dim=-1)


def parse_codebooks(entries: list[str]) -> list[tuple[int, int]]:
    """["8x256", ...] -> [(groups, size), ...], refusing a malformed entry by name."""
    parsed = []
    for entry in entries:
        try:
            groups, size = (int(x) for x in entry.lower().split("x"))
        except ValueError:
            raise UserError(f"--codebooks entry {entry!r} is not GROUPSxSIZE (e.g. 8x256)") from None
        if groups < 1 or size < 2:
            raise UserError(f"--codebooks entry {entry!r}: needs at least 1 group of at least 2 codes")
        parsed.append((groups, size))
    return parsed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="a MelCodec config whose codec.mel, codec.downsample and codec.griffin_lim to use "
                        "(default: configs/demo_codec.json)")
    p.add_argument("--train_dir", type=Path, required=True)
    p.add_argument("--test_dir", type=Path, required=True)
    p.add_argument("--train_files", type=int, default=600, help="training files for the k-means fit")
    p.add_argument("--every", type=int, default=120, help="score every N-th test file (sorted order)")
    p.add_argument("--codebooks", nargs="+", default=["8x256", "16x256", "8x1024", "16x1024"],
                   help="GROUPSxSIZE entries")
    return p.parse_args(argv)


def fit_split_vq(vectors: np.ndarray, groups: int, size: int) -> tuple[list[np.ndarray], list[MiniBatchKMeans]]:
    """(band indices of each group, its k-means codebook) fitted on token-frame vectors (frames, bands)."""
    if size > len(vectors):
        raise UserError(f"{groups}x{size}: {size} codes need at least as many training frames (have "
                        f"{len(vectors)}); raise --train_files")
    splits = np.array_split(np.arange(vectors.shape[1]), groups)
    fits = [MiniBatchKMeans(size, random_state=0, batch_size=4096, n_init=1, max_iter=50).fit(vectors[:, s])
            for s in splits]
    return splits, fits


def quantise(frames: torch.Tensor, splits: list[np.ndarray], fits: list[MiniBatchKMeans]) -> torch.Tensor:
    """Token-frame means (1, bands, frames) -> each group replaced by its nearest centroid, same shape."""
    values = frames[0].T.numpy().copy()
    for split, fit in zip(splits, fits):
        values[:, split] = fit.cluster_centers_[fit.predict(values[:, split])]
    return torch.from_numpy(values.T)[None].float()


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    config = load_config(args.config)
    log_mel, griffin_lim, downsample = mel_settings(config)
    codebooks = parse_codebooks(args.codebooks)
    rate = config["sample_rate"]
    frames_per_second = rate / config["codec"]["mel"]["hop_length"] / downsample

    train_files = find_audio_files(args.train_dir) if args.train_dir.is_dir() else []
    random.Random(0).shuffle(train_files)
    test_files = find_audio_files(args.test_dir)[:: max(1, args.every)] if args.test_dir.is_dir() else []
    if not train_files or not test_files:
        raise UserError("no audio files in --train_dir or --test_dir")
    with torch.inference_mode():
        vectors = np.concatenate([frame_log_mel(log_mel, load_audio(args.train_dir / f, rate)[0], downsample)[1][0].T
                                  .numpy() for f in train_files[: args.train_files]])
        tests = [(wav, *frame_log_mel(log_mel, wav, downsample))
                 for wav in (load_audio(args.test_dir / f, rate)[0] for f in test_files)]
    print(f"k-means on {len(vectors)} frames of {min(len(train_files), args.train_files)} training files; "
          f"{len(tests)} test files")
    print("| codebooks | kbit/s | ESTOI |\n|---|---|---|")
    for entry, codebook in [("none", None), *zip(args.codebooks, codebooks)]:
        fitted, kbps = None, "unquantised"
        if codebook is not None:
            groups, size = codebook
            fitted = fit_split_vq(vectors, groups, size)
            kbps = f"{groups * np.log2(size) * frames_per_second / 1000:.1f}"
        scores = []
        with torch.inference_mode():
            for wav, full, frames in tests:
                frames = frames if fitted is None else quantise(frames, *fitted)
                smooth = F.interpolate(frames, size=full.shape[-1], mode="linear", align_corners=False)
                scores.append(stoi(wav, griffin_lim(smooth, len(wav))[0].numpy(), rate, extended=True))
        print(f"| {entry} | {kbps} | {np.mean(scores):.3f} |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
