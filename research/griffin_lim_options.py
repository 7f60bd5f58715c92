"""Choose the demo codec's waveform step: copy-synthesis quality against speed for Griffin-Lim settings.

    python research/griffin_lim_options.py --checkpoint pretrained/demo_codec.pt --data_dir data/corpus/valid \
        --every 20 --options 512:32:zero 512:16 512:8 320:8 320:4 [--dnsmos] [--threads 2]

Each option is FFT size : iterations [: "zero" to start from zero phase instead of the integrated phase of
models/griffin_lim.py]. The codec encodes and decodes every N-th file of --data_dir (at least one second long) once;
each option then turns the same decoded log-mel into a waveform, timed on --threads threads, and is scored against
the input (wide-band PESQ, ESTOI, optionally DNSMOS OVRL). Choose on the valid split; report on the test split.

--oracles adds, for each option, the same iteration from what the codec would ideally give it: the clean recording's
own log-mel (no tokens), and its own STFT magnitude (no mel filterbank either); and a row for the clean recording
itself. They tell how far each step (tokens, filterbank, phase) stands between the input and the codec's output
(docs/experiments.md, item 47).

This file lives in research/, beside the project's modules rather than inside a package, so it puts the repository
root (the parent of research/) on sys.path before importing them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: see the module docstring

import cpu_speed  # noqa: E402,F401  (before torch: it sets the OpenMP wait policy, as in inference.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoint  # noqa: E402
import metrics  # noqa: E402
from models.griffin_lim import MelGriffinLim  # noqa: E402
from models.mel_codec import MelCodec  # noqa: E402
from utils import UserError, find_audio_files, load_audio, run_command  # noqa: E402


class ZeroPhaseGriffinLim(MelGriffinLim):
    """The iteration as it was before the integrated phase: every bin starts at phase zero (in utils.stft's
    convention, which the iteration's FrameSTFT rotates)."""

    def initial_phase(self, magnitude: torch.Tensor) -> torch.Tensor:
        return self.frame_stft.rotation.expand(magnitude.shape).clone()


def parse_option(text: str) -> tuple[int, int, bool]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "zero"):
        raise UserError(f"--options: {text!r} is not N_FFT:ITERATIONS or N_FFT:ITERATIONS:zero")
    return int(parts[0]), int(parts[1]), len(parts) == 3


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    codec = checkpoint.load_codec(args.checkpoint)
    if not isinstance(codec, MelCodec):
        raise UserError(f"{args.checkpoint} is a {type(codec).__name__}; this compares Griffin-Lim settings of a "
                        "MelCodec")
    files = find_audio_files(args.data_dir)[:: args.every]
    items = []
    with torch.inference_mode():
        for rel in files:
            audio = load_audio(args.data_dir / rel, codec.sample_rate)[0]
            if audio.size >= codec.sample_rate:
                wav = torch.from_numpy(audio)[None]
                items.append((audio, wav, codec.decode_latent(codec.quantizer.decode(codec.encode(wav)))))
    if not items:
        raise UserError(f"no file of at least one second among every {args.every}th of {args.data_dir}")
    seconds = sum(audio.size for audio, _, _ in items) / codec.sample_rate
    gl = codec.griffin_lim
    print(f"{len(items)} files, {seconds:.0f} s of {args.data_dir}; {args.threads} threads; shipped setting: "
          f"n_fft {gl.n_fft}, {gl.iterations} iterations\n")
    ovrl_column = " OVRL |" if args.dnsmos else ""
    print(f"| n_fft | iterations | start | from | PESQ | ESTOI |{ovrl_column} vocoder RTF |")
    print("|---:|---:|---|---|---:|---:|" + ("---:|" if args.dnsmos else "") + "---:|")

    def report(columns: str, outputs: list[np.ndarray], compute: float | None) -> None:
        scores = [metrics.score_pair(output, audio, codec.sample_rate, dnsmos=args.dnsmos)
                  for output, (audio, _, _) in zip(outputs, items)]
        means = {k: float(np.mean([s[k] for s in scores])) for k in ("pesq", "estoi", "dnsmos_ovrl") if k in scores[0]}
        ovrl = f" {means['dnsmos_ovrl']:.2f} |" if args.dnsmos else ""
        rtf = "" if compute is None else f"{compute / seconds:.4f}"
        print(f"| {columns} | {means['pesq']:.3f} | {means['estoi']:.3f} |{ovrl} {rtf} |", flush=True)

    if args.oracles:
        report("| | | the clean recording itself", [audio for audio, _, _ in items], None)
    for n_fft, iterations, zero in map(parse_option, args.options):
        kind = ZeroPhaseGriffinLim if zero else MelGriffinLim
        vocoder = kind(codec.log_mel.filters, gl.hop_length, gl.win_length, n_fft, iterations, gl.momentum,
                       gl.chunk_frames, gl.overlap_frames)
        columns = f"{n_fft} | {iterations} | {'zero' if zero else 'integrated'}"
        compute, outputs = 0.0, []
        with torch.inference_mode():
            for audio, _, decoded in items:
                started = time.perf_counter()
                outputs.append(vocoder(decoded, audio.size)[0].numpy())
                compute += time.perf_counter() - started
        report(f"{columns} | the codec's tokens", outputs, compute)
        if args.oracles:
            with torch.inference_mode():
                from_log_mel = [vocoder(codec.log_mel(wav), audio.size)[0].numpy() for audio, wav, _ in items]
                from_magnitude = []
                for audio, wav, _ in items:
                    magnitude = vocoder.frame_stft(wav).abs()
                    start = vocoder.initial_phase(magnitude)
                    from_magnitude.append(vocoder.iterate(magnitude, start, audio.size)[0].numpy())
            report(f"{columns} | the clean log-mel", from_log_mel, None)
            report(f"{columns} | the clean STFT magnitude", from_magnitude, None)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("pretrained/demo_codec.pt"), help="a MelCodec")
    p.add_argument("--data_dir", type=Path, required=True, help="held-out clean speech")
    p.add_argument("--every", type=int, default=1, help="take every N-th file (default: all)")
    p.add_argument("--options", nargs="+", default=["512:32:zero", "512:16", "512:8", "320:8", "320:4"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dnsmos", action="store_true", help="also DNSMOS OVRL (slow)")
    p.add_argument("--oracles", action="store_true",
                   help="also iterate from the clean log-mel and the clean STFT magnitude, and score the clean input")
    args = p.parse_args(argv)
    if args.every < 1 or args.threads < 1:
        p.error("--every and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
