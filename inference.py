"""Enhance a folder of recordings with ParaGSE (or the serial baseline), or re-synthesise it through the codec.

    python inference.py --input_dir noisy/ --output_dir enhanced/ [--checkpoint model.pt] [--device auto]
    python inference.py --codec_only --input_dir clean/ --output_dir resynth/ --checkpoint codec.pt

Reads wav/flac/ogg of any rate, bit depth and channel count; writes 16 kHz PCM-16 wav of the input's duration
under the same relative path. Existing outputs are kept (so an interrupted run resumes) unless --overwrite.
Exit code: 0 all done, 1 some files failed, 2 a usage error.

--quantize runs the predictor's Linear/LSTM layers in int8 (dynamic quantisation, CPU only), at the cost of some
tokens differing from fp32 (benchmark.py measures both): faster for a predictor of the paper's size (README section
5: a quarter less time), slower for the shipped demo model, whose small grouped layers it runs one group at a time.
--precision bf16 runs the token predictor under bfloat16 autocast (the codec stays float32): faster on GPUs
and on CPUs with bfloat16 instructions (AVX512-BF16, AMX), slower elsewhere; a few tokens differ from float32.
--no_blend writes the codec's re-synthesis alone (the paper's output) for a checkpoint whose inference.blend keeps
the degraded input where the predicted clean speech says it is intact (models/input_blend.py; the demo model does).
"""
from __future__ import annotations

import cpu_speed  # first: it sets the OpenMP wait policy before torch loads

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import check_blend, check_decoding, load_codec, load_enhancer
from models.codec import Codec
from models.input_blend import input_blend_for, token_probability
from models.int8 import quantize_predictor
from utils import (AUDIO_EXTENSIONS, REPO_ROOT, AudioError, UserError, argmax, atomic_write, find_audio_files,
                   load_audio, load_config, normalise_level, prepare_audio, require_writable, resolve_device,
                   run_command, save_audio)

DEFAULT_ENHANCER = REPO_ROOT / "pretrained" / "demo_paragse.pt"
DEFAULT_CODEC = REPO_ROOT / "pretrained" / "demo_codec.pt"
PRECISIONS = ("fp32", "bf16")
DC_NOTE_THRESHOLD = 0.01  # a smaller offset is removed without a note: it is within ordinary recordings' offsets
DROPOUT_MIN_SECONDS = 0.01  # a run of exact zeros at least this long, anywhere in a recording, is a dropout
DROPOUT_SEED = 0  # the noise put in dropouts is the same on every run


def dropout_mask(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """bool (samples,): the runs of exact digital zeros at least DROPOUT_MIN_SECONDS long."""
    zero = np.concatenate([[False], audio == 0, [False]])
    edges = np.flatnonzero(zero[1:] != zero[:-1])  # run starts and ends, alternating
    mask = np.zeros(audio.shape[0], dtype=bool)
    for start, end in zip(edges[::2], edges[1::2]):
        if end - start >= DROPOUT_MIN_SECONDS * sample_rate:
            mask[start:end] = True
    return mask


def fill_dropouts(audio: np.ndarray, mask: np.ndarray, sample_rate: int) -> np.ndarray:
    """The audio with its dropouts filled with seeded noise at the level of its quietest tenth of 20-ms frames
    (among frames not wholly zero).

    Why: no recording the model was trained on falls to digital silence between stretches of noise, and its
    degraded branch's attention spreads such a stretch over the whole window: 62 ms of zeros in a noisy recording
    changed 97 % of the predicted tokens outside them and made the whole output 3x as loud (clipped), where noise at
    the recording's own floor leaves it within 1 % of the output without the dropout.
    """
    frame = sample_rate // 50
    frames = audio[: audio.shape[0] // frame * frame].reshape(-1, frame).astype(np.float64)
    power = (frames ** 2).mean(axis=1)
    power = power[power > 0]
    level = np.sqrt(np.quantile(power, 0.1)) if power.size else 0.0
    filled = audio.copy()
    filled[mask] = np.random.default_rng(DROPOUT_SEED).standard_normal(int(mask.sum())) * level
    return filled


def predictor_precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context the token predictor runs in: nothing for "fp32", bfloat16 autocast for "bf16".

    Autocast is per thread: work handed to other threads re-enters it there (cpu_speed.run_concurrently does).
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass
class Result:
    audio: np.ndarray  # (samples,) float32 at the model's sample rate
    tokens: np.ndarray | None  # (groups, frames) predicted tokens, stitched across windows
    notes: list[str]


class Enhancer:
    """Codec + optional token predictor, applied to whole recordings in cross-faded windows.

    Windows are token-aligned and all the same length (the last one may be up to one token frame longer), so a
    recording of any length runs in bounded memory, full windows can be batched, and a recording shorter than one
    window is processed exactly as a whole.
    """

    def __init__(self, codec: Codec, predictor: torch.nn.Module | None, device: torch.device,
                 window_seconds: float, overlap_seconds: float, batch_size: int = 1, decoding: str = "argmax",
                 temperature: float = 1.0, input_level_db: float | None = None, precision: str = "fp32",
                 blend: dict | None = None):
        """decoding: "argmax" (the paper: the most likely token of every group) or "expected" (the codebook vectors
        averaged under each group's predicted distribution, sharpened by `temperature`; ParaGSE only).
        input_level_db: the active level (dBFS) a recording is brought to before the codec sees it, its DC offset
        removed; the output gets the input's level back. None: level as given (DC still removed).
        precision: "fp32", or "bf16" for the token predictor under bfloat16 autocast (see predictor_precision).
        blend: None (the codec's re-synthesis is the output, as in the paper) or InputBlend's smoothing_frames and
        fill_tolerance, with or without band_limit_depth_db, band_limit_max_hz and band_limit_clean_db: the degraded
        input kept where the predicted log-mel says it is intact, and below the limit of a band-limited input as far
        as it looks clean (models/input_blend.py; a predictor only)."""
        check_decoding(decoding, temperature, type(predictor) if predictor is not None else None)
        self.codec = codec.to(device).eval()
        self.predictor = predictor.to(device).eval() if predictor is not None else None
        self.device, self.batch_size = device, batch_size
        self.decoding, self.temperature = decoding, temperature
        self.input_level_db = input_level_db
        predictor_precision(device, precision)  # refuses an unknown name here, not at the first recording
        self.precision = precision
        check_blend(blend)
        self.blend = None
        if blend is not None and predictor is not None:
            self.blend = input_blend_for(codec, **blend).to(device)
        self.sample_rate = codec.sample_rate
        self.frame = codec.samples_per_token
        # How independent tasks of one batch run: in order here; cpu_speed.run_concurrently with `parallelize`.
        self.run_tasks = lambda tasks: [task() for task in tasks]
        self.window = self._align(window_seconds)
        self.overlap = self._align(overlap_seconds)
        if self.overlap >= self.window:
            raise UserError("inference.overlap_seconds must be shorter than inference.window_seconds")

    def _align(self, seconds: float) -> int:
        return max(1, round(seconds * self.sample_rate / self.frame)) * self.frame

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "auto", codec_only: bool = False,
             batch_size: int = 1, decoding: str | None = None, temperature: float | None = None,
             precision: str = "fp32", blend: bool = True) -> "Enhancer":
        """An enhancer checkpoint (default: the shipped demo model), or a codec alone with `codec_only`.

        decoding / temperature: None keeps the checkpoint's defaults (inference.decoding, inference.temperature).
        precision: "fp32" or "bf16" (the token predictor under bfloat16 autocast).
        blend: False writes the codec's re-synthesis alone even if the checkpoint's inference.blend is set.
        """
        device = resolve_device(device) if isinstance(device, str) else device
        if codec_only:
            codec, predictor = load_codec(path or DEFAULT_CODEC), None
            defaults = {"decoding": "argmax", "temperature": 1.0, "blend": None}
            # A codec stores no inference settings: its windows are the project's defaults.
            defaults |= {k: load_config()["inference"][k] for k in ("window_seconds", "overlap_seconds",
                                                                    "input_level_db")}
        else:
            predictor, codec, defaults = load_enhancer(path or DEFAULT_ENHANCER)
        return cls(codec, predictor, device, defaults["window_seconds"], defaults["overlap_seconds"], batch_size,
                   decoding or defaults["decoding"], defaults["temperature"] if temperature is None else temperature,
                   defaults["input_level_db"], precision, defaults["blend"] if blend else None)

    def parallelize(self) -> "Enhancer":
        """Run independent work as concurrent single-threaded tasks on CPU (cpu_speed); outputs are unchanged."""
        if self.device.type == "cpu":
            self.run_tasks = cpu_speed.run_concurrently
            cpu_speed.parallelize_vocoder(self.codec)
            if self.predictor is not None:
                cpu_speed.parallelize(self.predictor)
        return self

    @torch.inference_mode()
    def enhance_batch(self, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Equal-length segments (batch, samples) -> (enhanced (batch, samples), tokens (batch, groups, frames)).

        The whole pipeline, without windowing: callers keep segments short enough for memory (see __call__).
        """
        padded = self.codec.pad(segments)
        if self.predictor is None:
            tokens = self.codec.encode(padded)
            return self.codec.decode(tokens, segments.shape[-1]), tokens
        degraded_tokens, analysis, frames = self.encode_and_front(padded)
        with self.predictor_precision():
            group_logits = self.predictor.predict(self.predictor.branch.context(frames), degraded_tokens)
        if self.blend is None:
            decoded = self.codec.decode_latent(self.latent(group_logits))
            return self.codec.synthesise(decoded, segments.shape[-1]), argmax(group_logits)
        probabilities = self.probabilities(group_logits)
        decoded = self.codec.decode_latent(self.latent(group_logits, probabilities))
        keep, fill = self.blend.band_gains(decoded, analysis, token_probability(probabilities, degraded_tokens))
        # Griffin-Lim (a MelCodec's: input_blend_for) only where the blend takes some of its output.
        needed = self.blend.needed_frames(fill)
        generated = self.codec.griffin_lim(decoded, segments.shape[-1], needed)
        return self.blend.mix(analysis, keep, fill, generated, padded.shape[-1], needed), argmax(group_logits)

    def encode_and_front(self, padded: torch.Tensor) -> tuple[torch.Tensor, tuple | None, torch.Tensor]:
        """Token-aligned segments (batch, samples) -> (degraded tokens (batch, groups, frames), the blend's analysis
        of the input or None, the front of the predictor's token-free branch (1, batch, frames, dim)).

        The codec encoder and the branch's front (STFT, convolutions, BiLSTM) are independent and of about equal
        cost: two concurrent single-threaded tasks (on one thread a BiLSTM step is far shorter than a barrier between
        two). The branch's conformers then run on every thread.
        """
        def front() -> torch.Tensor:
            with self.predictor_precision():
                return self.predictor.branch.local(self.predictor.features(padded))

        def encode() -> tuple[torch.Tensor, tuple | None]:
            if self.blend is None:
                return self.codec.encode(padded), None
            # The blend measures the input with the codec's own log-mel (a MelCodec's: input_blend_for), which the
            # encoder computes anyway: once, for both.
            log_mel = self.codec.log_mel(padded)
            return self.codec.encode(padded, log_mel), self.blend.analyse(padded, log_mel)

        (degraded_tokens, analysis), frames = self.run_tasks([encode, front])
        return degraded_tokens, analysis, frames

    def predictor_precision(self) -> contextlib.AbstractContextManager:
        return predictor_precision(self.device, self.precision)

    def probabilities(self, group_logits: torch.Tensor) -> torch.Tensor:
        """Group logits (batch, groups, frames, codebook_size) -> the token distributions, sharpened by the
        temperature (float32, same shape)."""
        return (group_logits.float() / self.temperature).softmax(dim=-1)

    def latent(self, group_logits: torch.Tensor, probabilities: torch.Tensor | None = None) -> torch.Tensor:
        """Group logits (batch, groups, frames, codebook_size) -> the quantised latent the codec decodes: the arg-max
        tokens' codebook vectors, or with decoding "expected" the vectors expected under the distributions sharpened
        by the temperature (`probabilities(group_logits)`, passed if already computed)."""
        if self.decoding == "expected":
            if probabilities is None:
                probabilities = self.probabilities(group_logits)
            return self.codec.quantizer.decode_expected(probabilities)
        return self.codec.quantizer.decode(argmax(group_logits))

    def window_starts(self, length: int) -> list[int]:
        if length <= self.window:
            return [0]
        hop = self.window - self.overlap
        starts = list(range(0, length - self.window + 1, hop))
        last = (length - self.window) // self.frame * self.frame
        if last > starts[-1]:
            starts.append(last)
        return starts

    def __call__(self, audio: np.ndarray | torch.Tensor, sample_rate: int) -> tuple[np.ndarray, list[str]]:
        """Enhance one recording: numpy or torch, float or integer PCM, (samples,) or (channels, samples) in either
        order (the shorter axis is the channels), at any sample rate.

        Returns (enhanced audio, float32 (samples,) at `self.sample_rate`; notes saying what was changed on the way,
        as the command line prints them). Raises AudioError with a one-line reason for audio it cannot use.
        """
        samples, notes = prepare_audio(audio, sample_rate, self.sample_rate)
        result = self.enhance(samples)
        return result.audio, notes + result.notes

    def enhance(self, audio: np.ndarray) -> Result:
        """Mono float32 (samples,) at `self.sample_rate` -> Result (the windowed pipeline)."""
        length = audio.shape[0]
        if length < self.frame:
            raise AudioError(f"too short ({length} samples at {self.sample_rate} Hz; the codec needs at least "
                             f"{self.frame})")
        notes: list[str] = []
        if not np.any(audio):
            return Result(np.zeros_like(audio), None, ["input is silent: the output is silence"])
        offset = float(audio.mean(dtype=np.float64))
        if abs(offset) >= DC_NOTE_THRESHOLD:
            notes.append(f"removed a DC offset of {offset:+.3f}")
        dropouts = dropout_mask(audio, self.sample_rate)
        if dropouts.any():
            audio = fill_dropouts(audio, dropouts, self.sample_rate)
            notes.append(f"{1000 * dropouts.sum() / self.sample_rate:.0f} ms of digital silence (dropouts) filled "
                         "with noise at the recording's floor for the model; silent in the output")
        # One gain for the whole recording (not per window), so the level does not pump from window to window.
        wav, gain = normalise_level(torch.from_numpy(audio)[None], self.input_level_db, self.sample_rate)
        wav = wav[0].to(self.device)
        starts = self.window_starts(length)
        ends = [s + self.window for s in starts[:-1]] + [length]
        output = torch.zeros(length, device=self.device)
        weight = torch.zeros(length, device=self.device)
        token_frames = (self.codec.padded_length(length) + self.codec.hop_length) // self.frame
        tokens = torch.zeros(self.codec.num_groups, token_frames, dtype=torch.long, device=self.device)
        ramp = torch.linspace(0, 1, self.overlap + 2, device=self.device)[1:-1]
        # Batch windows of equal length; the (possibly longer) last one runs on its own.
        full = list(range(len(starts) - 1))
        batches = [full[i : i + self.batch_size] for i in range(0, len(full), self.batch_size)] + [[len(starts) - 1]]
        for batch in batches:
            segments = torch.stack([wav[starts[i] : ends[i]] for i in batch])
            enhanced, window_tokens = self.enhance_batch(segments)
            for row, i in enumerate(batch):
                piece = enhanced[row]
                w = torch.ones_like(piece)
                if i > 0:  # cross-fade in over the overlap with the previous window
                    w[: self.overlap] = ramp
                if i < len(starts) - 1:  # and out over the overlap with the next one
                    w[-self.overlap :] = torch.minimum(w[-self.overlap :], ramp.flip(0))
                output[starts[i] : ends[i]] += w * piece
                weight[starts[i] : ends[i]] += w
                first = starts[i] // self.frame + (self.overlap // self.frame // 2 if i > 0 else 0)
                available = window_tokens.shape[-1] - (first - starts[i] // self.frame)
                count = min(available, token_frames - first)
                tokens[:, first : first + count] = window_tokens[row, :, -available:][:, :count]
        output = output / weight.clamp_min(1e-8) / float(gain)
        if dropouts.any():
            output[torch.from_numpy(dropouts).to(self.device)] = 0.0
        if float(output.abs().max()) > 1.0:
            notes.append("output limited to full scale")
        return Result(output.cpu().numpy(), tokens.cpu().numpy(), notes)


# ----------------------------------------------------------------------------------------------- folder job
def real_path(path: Path) -> Path:
    """Where a path leads, links followed; unlike Path.resolve, a link loop gives a path instead of an exception (the
    file is then reported as unreadable, like any other)."""
    return Path(os.path.realpath(path))


def plan_outputs(input_dir: Path, output_dir: Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs for a folder (searched recursively) or a single file; refuses layouts where an output
    could land on an input."""
    if input_dir.is_file():
        if input_dir.suffix.lower() not in AUDIO_EXTENSIONS:
            raise UserError(f"{input_dir} is not a {'/'.join(AUDIO_EXTENSIONS)} file")
        in_root, inputs = input_dir.resolve().parent, [Path(input_dir.name)]
    else:
        in_root = input_dir.resolve()
        inputs = find_audio_files(in_root)
    out_root = output_dir.resolve()
    if out_root == in_root:
        raise UserError(f"output folder {output_dir} is the input folder: outputs would overwrite inputs; "
                        "choose another --output_dir")
    if out_root.is_relative_to(in_root):  # outputs nested in the input folder are not inputs of a later run
        inputs = [p for p in inputs if not real_path(in_root / p).is_relative_to(out_root)]
    if not inputs:
        raise UserError(f"no .wav/.flac/.ogg/.mp3 files under {input_dir}")
    wanted = [p.with_suffix(".wav") for p in inputs]
    clashes = {w for w in wanted if wanted.count(w) > 1}
    # a.wav and a.flac side by side: keep the source extension in the name rather than overwrite one with the other.
    outputs = [Path(f"{p}.wav") if w in clashes and p.suffix.lower() != ".wav" else w for p, w in zip(inputs, wanted)]
    input_set = {real_path(in_root / p) for p in inputs}
    for out in outputs:
        if real_path(out_root / out) in input_set:
            raise UserError(f"output {output_dir / out} would overwrite an input; choose an --output_dir outside "
                            f"{input_dir}")
    return [(in_root / i, out_root / o) for i, o in zip(inputs, outputs)]


SETTINGS_FILE = ".paragse_settings.json"
# Settings added after output folders were first written: a folder's file without one was made with this value.
LATER_SETTINGS = {"precision": "fp32", "blend": False}


def record_settings(output_dir: Path, settings: dict, overwrite: bool) -> None:
    """Note in the output folder what its files are made with, and refuse (before any compute) to mix in outputs
    made otherwise: a rerun skips the files already there, which would then come from other settings."""
    path = output_dir / SETTINGS_FILE
    if path.is_file() and not overwrite:
        try:
            before = json.loads(path.read_text())
        except ValueError:  # not JSON, or not text (UnicodeDecodeError is a ValueError)
            before = None
        if not isinstance(before, dict):
            raise UserError(f"{path} is not readable, so what its outputs were made with is unknown: add --overwrite "
                            "to redo them, or choose another --output_dir")
        before = LATER_SETTINGS | before
        changed = [f"{key} {before.get(key)} → {value}" for key, value in settings.items()
                   if before.get(key) != value]
        if changed:
            raise UserError(f"the outputs in {output_dir} were made with other settings ({'; '.join(changed)}): add "
                            "--overwrite to redo them, or choose another --output_dir")
    atomic_write(path, (json.dumps(settings, indent=1) + "\n").encode())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_dir", help="folder of degraded recordings (searched recursively), or one file")
    p.add_argument("--test_noise_wav", dest="input_dir_alias", help="same as --input_dir")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--checkpoint", help=f"enhancer checkpoint (default: {DEFAULT_ENHANCER.relative_to(REPO_ROOT)})")
    p.add_argument("--codec_only", action="store_true", help="re-synthesise through the codec (copy-synthesis)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--batch_size", type=int, default=1, help="windows of a long recording run together")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--quantize", action="store_true",
                   help="int8 dynamic quantisation of the predictor's Linear/LSTM layers (CPU; slightly different "
                        "tokens, see benchmark.py; faster for the paper's configuration, slower for the demo model)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: the token predictor under bfloat16 autocast, faster on GPUs and CPUs with bfloat16 "
                        "instructions (a few tokens differ; see benchmark.py)")
    p.add_argument("--decoding", choices=("argmax", "expected"),
                   help="argmax: the most likely token per group (the paper); expected: codebook vectors averaged "
                        "under the predicted distributions (default: the checkpoint's inference.decoding)")
    p.add_argument("--temperature", type=float,
                   help="sharpens (<1) the distributions of --decoding expected (default: the checkpoint's)")
    p.add_argument("--no_blend", action="store_true",
                   help="the codec's re-synthesis alone (the paper's output), not blended with the degraded input "
                        "where the checkpoint's inference.blend would keep it")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--save_tokens", action="store_true", help="also write <name>.tokens.npy (groups, frames)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    args.input_dir = args.input_dir or args.input_dir_alias
    if not args.input_dir:
        p.error("--input_dir (or --test_noise_wav) is required")
    if args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    return args


def run(args: argparse.Namespace) -> int:
    input_dir, output_dir = Path(args.input_dir), Path(args.output_dir)
    if not input_dir.exists():
        raise UserError(f"input folder or file not found: {input_dir}")
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = DEFAULT_CODEC if args.codec_only else DEFAULT_ENHANCER
        print(f"using the demo model {checkpoint.relative_to(REPO_ROOT)} (small, trained on CPU; see MODEL_CARD.md)")
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    jobs = plan_outputs(input_dir, output_dir)
    require_writable(output_dir, "--output_dir")
    enhancer = Enhancer.load(checkpoint, device, args.codec_only, args.batch_size, args.decoding,
                             args.temperature, args.precision, not args.no_blend).parallelize()
    if args.precision != "fp32" and (args.codec_only or args.quantize):
        raise UserError(f"--precision {args.precision} is for the token predictor in floating point; drop "
                        f"{'--codec_only' if args.codec_only else '--quantize'} or --precision")
    if args.quantize:
        if enhancer.predictor is None:
            raise UserError("--quantize quantises the token predictor; there is none with --codec_only")
        if device.type != "cpu":
            raise UserError("--quantize uses CPU int8 kernels; add --device cpu")
        enhancer.predictor = quantize_predictor(enhancer.predictor)
    record_settings(output_dir, {"checkpoint": str(Path(checkpoint).resolve()), "codec_only": args.codec_only,
                                 "decoding": enhancer.decoding, "temperature": enhancer.temperature,
                                 "quantize": args.quantize, "precision": args.precision,
                                 "blend": enhancer.blend is not None}, args.overwrite)

    done = skipped = failed = 0
    audio_seconds = compute_seconds = 0.0
    interrupted = False
    progress = tqdm(jobs, unit="file", disable=None)
    named_from = input_dir.resolve() if input_dir.is_dir() else None  # a single file is named as given
    try:
        for source, target in progress:
            name = source.relative_to(named_from) if named_from else input_dir
            tokens_missing = args.save_tokens and not target.with_suffix(".tokens.npy").exists()
            if target.exists() and not args.overwrite and not tokens_missing:
                skipped += 1
                continue
            try:
                audio, notes = load_audio(source, enhancer.sample_rate)
                started = time.perf_counter()
                result = enhancer.enhance(audio)
                compute_seconds += time.perf_counter() - started
                save_audio(target, result.audio, enhancer.sample_rate)
                if args.save_tokens and result.tokens is not None:
                    tokens = io.BytesIO()
                    np.save(tokens, result.tokens.astype(np.int16))
                    atomic_write(target.with_suffix(".tokens.npy"), tokens.getvalue())
            except AudioError as e:
                failed += 1
                progress.write(f"failed {name}: {e}")
                continue
            except OSError as e:
                failed += 1
                progress.write(f"failed {name}: cannot write {target} ({e.strerror or e})")
                continue
            done += 1
            audio_seconds += audio.shape[0] / enhancer.sample_rate
            for note in notes + result.notes:
                progress.write(f"note {name}: {note}")
    except KeyboardInterrupt:  # Ctrl-C: what was written stays (atomic writes); rerunning resumes after it
        interrupted = True
        progress.close()
        print("interrupted: the files done so far are complete; run the same command again to go on")
    rtf = compute_seconds / audio_seconds if audio_seconds else float("nan")
    print(f"done {done}, skipped (already there) {skipped}, failed {failed}; {audio_seconds:.1f} s of audio in "
          f"{compute_seconds:.1f} s, real-time factor {rtf:.3f} on {device}; outputs in {output_dir}")
    return 130 if interrupted else 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cpu_speed.enable()
    return run_command(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
