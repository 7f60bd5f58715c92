"""Does an MDCT codec reproduce the MDCT signs (the phase) of speech, or only its magnitudes?

    python research/phase_diagnosis.py --checkpoint runs/codec/checkpoint_00010000.pt --data_dir data/corpus/test \
        --every 120

Prints, over every N-th file of --data_dir:
  * per MDCT bin (200 Hz wide at 16 kHz), the correlation between the codec's decoded MDCT and the input's: 0 means
    the decoder draws the signs at random, 1 means it reproduces the waveform;
  * ESTOI of the codec's copy-synthesis next to two oracles built from the input's own MDCT: exact magnitudes with
    random signs (the ceiling of a decoder that does not know the phase), and exact signs below 1 kHz only.

Why only MDCT codecs (models.mdct_codec.MDCTCodec): the question is whether a decoder that must output a critically
sampled MDCT learns its signs; the demo codec (MelCodec) decodes a log-mel and leaves the phase to Griffin-Lim, so
it has no MDCT to compare and is refused.

This file lives in research/, beside the project's modules rather than inside a package, so it puts the repository
root (the parent of research/) on sys.path before importing them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: see the module docstring

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pystoi import stoi  # noqa: E402

from checkpoint import load_codec  # noqa: E402
from models.mdct import bin_correlation  # noqa: E402
from models.mdct_codec import MDCTCodec  # noqa: E402
from utils import UserError, find_audio_files, load_audio, run_command  # noqa: E402

LOW_BAND_HZ = 1000


def bins_below(codec: MDCTCodec, hz: float) -> int:
    """How many MDCT bins lie wholly below `hz` (the codec has `hop_length` bins spanning 0 to Nyquist)."""
    return int(hz // (codec.sample_rate / 2 / codec.hop_length))


def load_mdct_codec(path: Path) -> MDCTCodec:
    """The codec of a codec or enhancer checkpoint, in float32; a one-line UserError for any other codec class."""
    codec = load_codec(path)
    if not isinstance(codec, MDCTCodec):
        raise UserError(f"{path}: its codec is a {type(codec).__name__}, not an MDCTCodec; it decodes no MDCT, so "
                        "there is no phase to diagnose")
    return codec.float().eval()


@torch.inference_mode()
def diagnose(codec: MDCTCodec, wav: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """wav (1, samples) -> (per-bin correlation (bins,), {candidate name: ESTOI against wav})."""
    rate, low_bins = codec.sample_rate, bins_below(codec, LOW_BAND_HZ)
    padded = codec.pad(wav)
    mdct = codec.mdct(padded)  # (1, bins, frames)
    # The decoded spectrum before synthesis: quantised latent of the tokens -> decoder.
    decoded = codec.decode_latent(codec.quantizer.decode(codec.encode(padded)))
    random_signs = torch.where(torch.rand(mdct.shape, generator=generator) < 0.5, -1.0, 1.0)
    low_exact = torch.cat([mdct[:, :low_bins], mdct[:, low_bins:].abs() * random_signs[:, low_bins:]], 1)
    length = padded.shape[-1]
    candidates = {"codec": codec.mdct.inverse(decoded, length),
                  "random signs": codec.mdct.inverse(mdct.abs() * random_signs, length),
                  f"signs below {LOW_BAND_HZ} Hz": codec.mdct.inverse(low_exact, length)}
    reference = wav[0].numpy()
    scores = {name: stoi(reference, out[0, : wav.shape[-1]].numpy(), rate, extended=True)
              for name, out in candidates.items()}
    return bin_correlation(mdct, decoded), scores


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="an MDCT codec, or an enhancer carrying one")
    p.add_argument("--data_dir", type=Path, required=True, help="held-out clean speech")
    p.add_argument("--every", type=int, default=1, help="take every N-th file (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-sign oracle")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    codec = load_mdct_codec(args.checkpoint)
    files = find_audio_files(args.data_dir)[:: max(1, args.every)] if args.data_dir.is_dir() else []
    if not files:
        raise UserError(f"no audio files under {args.data_dir}")
    rate, low_bins = codec.sample_rate, bins_below(codec, LOW_BAND_HZ)
    generator = torch.Generator().manual_seed(args.seed)
    correlations = []
    scores: dict[str, list[float]] = {}
    for f in files:
        wav = torch.from_numpy(load_audio(args.data_dir / f, rate)[0])[None]
        correlation, file_scores = diagnose(codec, wav, generator)
        correlations.append(correlation)
        for name, value in file_scores.items():
            scores.setdefault(name, []).append(value)
    correlation = torch.stack(correlations).mean(0).numpy()
    bin_hz = rate / 2 / codec.hop_length
    print(f"{len(files)} files of {args.data_dir}, codec {args.checkpoint}")
    print(f"MDCT correlation, decoded vs input, per bin (mean of files; below {LOW_BAND_HZ} Hz: "
          f"{correlation[:low_bins].mean():.3f}):")
    print(" ".join(f"{int(k * bin_hz)}-{int((k + 1) * bin_hz)}Hz:{c:+.2f}" for k, c in enumerate(correlation)))
    print("ESTOI (mean): " + ", ".join(f"{name} {np.mean(v):.3f}" for name, v in scores.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
