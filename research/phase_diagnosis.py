"""Does a codec reproduce the MDCT signs (the phase) of speech, or only its magnitudes?

    python scripts/phase_diagnosis.py --checkpoint pretrained/demo_codec.pt --data_dir data/corpus/test --every 120

Prints, over every N-th file of --data_dir:
  * per MDCT bin (200 Hz wide), the correlation between the codec's decoded MDCT and the input's: 0 means the
    decoder draws the signs at random, 1 means it reproduces the waveform;
  * ESTOI of the codec's copy-synthesis next to two oracles built from the input's own MDCT: exact magnitudes with
    random signs (the ceiling of a decoder that does not know the phase), and exact signs below 1 kHz only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from pystoi import stoi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.codec import Codec  # noqa: E402
from models.mdct import bin_correlation  # noqa: E402
from utils import UserError, find_audio_files, load_audio  # noqa: E402

LOW_BAND_HZ = 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a codec, or an enhancer carrying one")
    p.add_argument("--data_dir", type=Path, required=True, help="held-out clean speech")
    p.add_argument("--every", type=int, default=1, help="take every N-th file (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-sign oracle")
    args = p.parse_args(argv)
    try:
        codec = Codec.load(args.checkpoint).float().eval()
        if codec.output != "mdct":
            raise UserError(f"{args.checkpoint}: its decoder outputs {codec.output}, not MDCT; nothing to diagnose")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = find_audio_files(args.data_dir)[:: max(1, args.every)] if args.data_dir.is_dir() else []
    if not files:
        print(f"error: no audio files under {args.data_dir}", file=sys.stderr)
        return 2
    rate = codec.sample_rate
    low_bins = codec.bins_below(LOW_BAND_HZ)
    generator = torch.Generator().manual_seed(args.seed)
    correlations = []
    scores: dict[str, list[float]] = {"codec": [], "random signs": [], f"signs below {LOW_BAND_HZ} Hz": []}
    with torch.inference_mode():
        for f in files:
            wav = torch.from_numpy(load_audio(args.data_dir / f, rate)[0])[None]
            padded = codec.pad(wav)
            mdct = codec.mdct(padded)  # (1, bins, frames)
            decoded = codec.decode_spectrum(codec.encode(padded))
            correlations.append(bin_correlation(mdct, decoded))
            random_signs = torch.where(torch.rand(mdct.shape, generator=generator) < 0.5, -1.0, 1.0)
            low_exact = torch.cat([mdct[:, :low_bins], mdct[:, low_bins:].abs() * random_signs[:, low_bins:]], 1)
            candidates = {"codec": codec.mdct.inverse(decoded, padded.shape[-1]),
                          "random signs": codec.mdct.inverse(mdct.abs() * random_signs, padded.shape[-1]),
                          f"signs below {LOW_BAND_HZ} Hz": codec.mdct.inverse(low_exact, padded.shape[-1])}
            reference = wav[0].numpy()
            for name, out in candidates.items():
                scores[name].append(stoi(reference, out[0, : wav.shape[-1]].numpy(), rate, extended=True))
    correlation = torch.stack(correlations).mean(0).numpy()
    bin_hz = rate / 2 / codec.hop_length
    print(f"{len(files)} files of {args.data_dir}, codec {args.checkpoint}")
    print(f"MDCT correlation, decoded vs input, per bin (mean of files; below {LOW_BAND_HZ} Hz: "
          f"{correlation[:low_bins].mean():.3f}):")
    print(" ".join(f"{int(k * bin_hz)}-{int((k + 1) * bin_hz)}Hz:{c:+.2f}" for k, c in enumerate(correlation)))
    print("ESTOI (mean): " + ", ".join(f"{name} {np.mean(v):.3f}" for name, v in scores.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
