"""What a bitrate can carry before any training: split VQ of the 50 Hz log-mel, then Griffin-Lim, scored by ESTOI.

    python scripts/mel_vq_oracle.py --train_dir data/corpus/train --test_dir data/corpus/test --every 120 \
        --train_files 600 --codebooks 8x256 16x256 8x1024 16x1024

The codec's log-mel (`codec.loss.mel`) is averaged over each token frame (`codec.encoder.downsample` MDCT frames,
20 ms), each frame's bands are split into G contiguous groups and every group is replaced by the nearest of K
k-means centroids fitted on --train_files training files (G x log2(K) bits per frame, the same count as G streams
of K tokens). The frames are interpolated back to the MDCT rate and turned into a waveform by the codec's own
Griffin-Lim. The first row ("none") skips the quantisation: what the 50 Hz frame rate alone leaves of the
intelligibility. A trained codec should beat its row; it is the bar, not a ceiling.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pystoi import stoi  # noqa: E402
from sklearn.cluster import MiniBatchKMeans  # noqa: E402

from models.griffin_lim import MelGriffinLim  # noqa: E402
from models.losses import LogMel  # noqa: E402
from utils import find_audio_files, load_audio, load_config  # noqa: E402


def frame_log_mel(log_mel: LogMel, wav: np.ndarray, downsample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """wav (samples,) -> (log-mel (1, bands, frames), its token-frame means (1, bands, frames // downsample))."""
    full = log_mel(torch.from_numpy(wav).float()[None])
    usable = full.shape[-1] // downsample * downsample
    bands = full.shape[1]
    return full, full[..., :usable].reshape(1, bands, usable // downsample, downsample).mean(dim=-1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="config whose codec.loss.mel and Griffin-Lim to use")
    p.add_argument("--train_dir", type=Path, required=True)
    p.add_argument("--test_dir", type=Path, required=True)
    p.add_argument("--train_files", type=int, default=600, help="training files for the k-means fit")
    p.add_argument("--every", type=int, default=120, help="score every N-th test file (sorted order)")
    p.add_argument("--codebooks", nargs="+", default=["8x256", "16x256", "8x1024", "16x1024"],
                   help="GROUPSxSIZE entries")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    config = load_config(args.config)
    log_mel, griffin_lim = LogMel.from_config(config), MelGriffinLim.from_config(config)
    downsample, rate = config["codec"]["encoder"]["downsample"], config["sample_rate"]
    bands = config["codec"]["loss"]["mel"]["n_mels"]
    frames_per_second = rate / config["codec"]["mdct"]["hop_length"] / downsample

    train_files = find_audio_files(args.train_dir)
    random.Random(0).shuffle(train_files)
    test_files = find_audio_files(args.test_dir)[:: args.every]
    if not train_files or not test_files:
        print("error: no audio files in --train_dir or --test_dir", file=sys.stderr)
        return 2
    vectors = np.concatenate([frame_log_mel(log_mel, load_audio(args.train_dir / f)[0], downsample)[1][0].T.numpy()
                              for f in train_files[: args.train_files]])
    tests = [(wav, *frame_log_mel(log_mel, wav, downsample))
             for wav in (load_audio(args.test_dir / f)[0] for f in test_files)]
    print(f"k-means on {len(vectors)} frames of {min(len(train_files), args.train_files)} training files; "
          f"{len(tests)} test files")
    print("| codebooks | kbit/s | ESTOI |\n|---|---|---|")
    for entry in ["none", *args.codebooks]:
        if entry == "none":
            quantise, kbps = None, "unquantised"
        else:
            groups, size = (int(x) for x in entry.split("x"))
            splits = np.array_split(np.arange(bands), groups)
            fits = [MiniBatchKMeans(size, random_state=0, batch_size=4096, n_init=1, max_iter=50).fit(vectors[:, s])
                    for s in splits]
            quantise, kbps = (splits, fits), f"{groups * np.log2(size) * frames_per_second / 1000:.1f}"
        scores = []
        for wav, full, frames in tests:
            if quantise is not None:
                values = frames[0].T.numpy().copy()
                for split, fit in zip(*quantise):
                    values[:, split] = fit.cluster_centers_[fit.predict(values[:, split])]
                frames = torch.from_numpy(values.T)[None].float()
            smooth = F.interpolate(frames, size=full.shape[-1], mode="linear", align_corners=False)
            scores.append(stoi(wav, griffin_lim(smooth, len(wav))[0].numpy(), rate, extended=True))
        print(f"| {entry} | {kbps} | {np.mean(scores):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
