"""Speed benchmark: ParaGSE against the serial baseline on this CPU (whole pipeline, random seeded weights).

    python benchmark.py [--config config.json] [--serial_config configs/serial.json] [--threads 2] [--seconds 10]
                        [--repeats 5] [--lengths 5,10,60,600] [--batch_sizes 1,4] [--quantize] [--json out.json]
                        [--skip_serial] [--precision fp32|bf16]
    python benchmark.py --checkpoint [CKPT] [--peers] [--threads 2] [--seconds 10] [--json out.json]
                        [--precision fp32|bf16]

ParaGSE is built at --config (the paper's by default) on its group-VQ codec; the serial (UDSE-style) baseline at
--serial_config, the same codec with a residual VQ. Weights are random (seeded), which is all a
speed measurement needs. The audio is a real speech clip from examples/clean tiled to length (or, without one, a
seeded noise signal with a speech-like envelope). Timings run under torch.inference_mode after a warm-up call;
each figure is the median over --repeats, with the measured stages and systems interleaved round-robin so that a
change of machine load hits all of them alike. The machine's load average is recorded at the start and the end.

Reported, per system: parameters (predictor, codec encoder, quantiser, decoder); GFLOPs per second of audio;
real-time factor (compute seconds / audio seconds, lower is faster) of each stage and of the whole pipeline
(inference.Enhancer.enhance_batch, exactly what inference.py runs); the serial/parallel RTF ratio; the CPU's
measured fp32 matrix-multiply rate (a 2048^2 product timed in the same interleaved rounds as the pipelines) and the
RTF it implies as a lower bound; RTF and peak resident memory against recording length through the windowed
inference.Enhancer (each length in a fresh process, so the peak of one does not hide the next); throughput with
batches of equal-length clips; and, with --quantize, int8 dynamic quantisation of the predictor: its RTF and the
fraction of tokens identical to fp32.

--precision bf16 runs every token predictor (ParaGSE's and the serial baseline's) under bfloat16 autocast, as
inference.py --precision bf16 does; the matmul rate behind the bound is then measured in bfloat16 too, and the JSON
adds `token_agreement_fp32`, the fraction of the pipeline's tokens identical to float32 on the timed clip.

With --checkpoint (no value: the shipped demo model), a trained enhancer is timed instead, as inference.py runs it
(its own decoding and windows), each stage called as the pipeline calls it: "encoder_and_front" (the codec
encoder, with the blend's analysis of the input where there is a blend, concurrently with the front of the degraded
branch: STFT features, convolutions, BiLSTM), "context" (the degraded branch's conformers and projection),
"token_branches" (the group logits), "decoder" (the codec decoder network, from the tokens or the expected codebook
vectors), "vocoder" (the decoder output to a waveform: Griffin-Lim or the inverse MDCT), "blend" (with the
checkpoint's inference.blend: the degraded input mixed in, models/input_blend.py) and "total" (the windowed
pipeline of inference.Enhancer.enhance). --peers times the free enhancers of peers.py on the same audio in the
same interleaved rounds, so the RTFs compare like with like. The JSON then has `checkpoint` ({"path", "rtf",
"stages"}) and `peers` ({name: rtf}).

Stages: "stft" (STFT features), "encoder" (codec encoder to tokens), "stft_encoder" (both), "predictor" (the token
predictor on those: degraded branch plus token branches or serial generators), "decoder" (codec decoder), and
"total" (the pipeline). The pipeline computes the codec encoder and the predictor's degraded branch concurrently,
so "total" can be below the sum of the stages.

FLOPs: torch.utils.flop_counter.FlopCounterMode counts matrix products, convolutions and attention, but not the
fused LSTM kernel. LSTM FLOPs are added analytically, counting each multiply-add as two FLOPs like the counter:
for every LSTM layer and direction, each frame costs 2 * 4H * (I + H) (the four gates' input and recurrent
products, input size I, hidden size H), i.e. 8 * H * (I + H) FLOPs per frame per direction per layer; gate
nonlinearities and element-wise updates are left out, as the counter leaves out all element-wise work. The
counter does not count the FFT either, so "stft" shows 0; it is ~5 N log2 N per frame (N = 1024, 400 frames a
second: 0.02 GFLOP per audio second), negligible.
"""
from __future__ import annotations

import cpu_speed  # first: it sets the OpenMP wait policy before torch loads

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

import inference
import peers
from models import Codec, build_codec, build_enhancer, onednn
from models.conformer import GroupedBiLSTM
from models.input_blend import token_probability
from models.int8 import quantize_predictor
from utils import (REPO_ROOT, UserError, argmax, atomic_write, count_parameters, load_audio, load_config,
                   normalise_level, require_writable, seed_everything)

SEED = 0
CPU = torch.device("cpu")
STAGES = ("stft", "encoder", "stft_encoder", "predictor", "decoder", "total")
MATMUL_SIZE = 2048
MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------- inputs
def speech_clip(sample_rate: int) -> np.ndarray | None:
    """The first real speech clip of examples/clean (PARAGSE_EXAMPLES overrides the folder), or None."""
    folder = Path(os.environ.get("PARAGSE_EXAMPLES", REPO_ROOT / "examples")) / "clean"
    clips = sorted(folder.glob("*.wav"))
    return load_audio(clips[0], sample_rate)[0] if clips else None


def benchmark_audio(seconds: float, sample_rate: int, offset: int = 0) -> np.ndarray:
    """`seconds` of test audio: real speech tiled to length (rotated by `offset` samples), else seeded noise.

    The fallback is white noise under a 4 Hz syllable-like envelope, so it has speech's bursts and pauses.
    """
    length = max(1, round(seconds * sample_rate))
    clip = speech_clip(sample_rate)
    if clip is not None and np.any(clip):
        return np.ascontiguousarray(np.roll(np.resize(clip, length), offset), dtype=np.float32)
    rng = np.random.default_rng(SEED + offset)
    t = np.arange(length) / sample_rate
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 2 * np.pi)), 0, None) ** 2
    return (0.1 * envelope * rng.standard_normal(length)).astype(np.float32)


@dataclass
class System:
    name: str
    codec: Codec
    predictor: torch.nn.Module
    enhancer: inference.Enhancer


def build_system(name: str, config: dict, device: torch.device = CPU, batch_size: int = 1,
                 precision: str = "fp32") -> System:
    """A codec and token predictor with seeded random weights, wrapped in the inference pipeline as inference.py
    runs it (on CPU, independent work as concurrent tasks, cpu_speed); `batch_size` windows of a long recording
    go through the predictor at once."""
    seed_everything(SEED)
    codec = build_codec(config["codec"], config["sample_rate"]).eval().to(device)
    predictor = build_enhancer(config["enhancer"], codec).eval().to(device)
    return System(name, codec, predictor, make_enhancer(codec, predictor, config, device, batch_size, precision))


def make_enhancer(codec: Codec, predictor: torch.nn.Module | None, config: dict, device: torch.device = CPU,
                  batch_size: int = 1, precision: str = "fp32") -> inference.Enhancer:
    window = config["inference"]
    return inference.Enhancer(codec, predictor, device, window["window_seconds"], window["overlap_seconds"],
                              batch_size, input_level_db=window["input_level_db"],
                              precision=precision).parallelize()


# ---------------------------------------------------------------------------------------- sizes and FLOPs
def parameter_counts(system: System) -> dict[str, int]:
    codec = system.codec
    counts = {"predictor": count_parameters(system.predictor), "quantizer": count_parameters(codec.quantizer),
              "codec_decoder": count_parameters(codec.decoder)}
    counts["codec_encoder"] = count_parameters(codec) - counts["quantizer"] - counts["codec_decoder"]
    counts["total"] = sum(counts.values())
    return counts


def lstm_flops(model: torch.nn.Module, frames: int, batch: int) -> int:
    """Analytic FLOPs of every GroupedBiLSTM in `model` over `frames` frames: 8 * H * (I + H) per frame, layer,
    direction and group (see the module docstring)."""
    total = 0
    for module in model.modules():
        if isinstance(module, GroupedBiLSTM):
            hidden = module.hidden_size
            for layer in range(module.num_layers):
                inputs = module.weight_ih[layer].shape[-1]
                total += module.groups * 2 * 8 * hidden * (inputs + hidden) * frames * batch
    return total


def counter_misses_lstm() -> bool:
    """Whether FlopCounterMode leaves out the fused LSTM kernel (then the analytic count is added, never twice)."""
    lstm = GroupedBiLSTM(1, 4, 4, 1).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        lstm(torch.zeros(1, 1, 3, 4))
    return counter.get_total_flops() == 0


if onednn.linear_pointwise is not None:
    @register_flop_formula(onednn.linear_pointwise)
    def _linear_pointwise_flops(*args, out_shape=None, **kwargs) -> int:
        """The counter knows aten's products only; CPU inference runs oneDNN's fused Linear (models/onednn.py). Its
        overloads take (input, weight, ...) and (input, other, weight, ...): 2 FLOPs per multiply-add."""
        input_shape, weight_shape = args[0], args[1] if len(args) == 6 else args[2]
        return 2 * math.prod(input_shape[:-1]) * weight_shape[0] * weight_shape[1]


def counted_flops(fn: Callable[[], object], threads: int) -> int:
    """FLOPs FlopCounterMode sees in one call of `fn`.

    Dispatch modes are thread-local and inference spreads work over pool threads, so the count runs with one
    intra-op thread, where everything stays on this thread (and gives bit-identical results). It runs under
    no_grad rather than inference_mode: weight-norm parametrisations fail under the counter in inference mode.
    """
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.set_num_threads(threads)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------- timings
def stage_functions(system: System, wav: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Zero-argument calls for each stage of `system` on the batch `wav` (batch, samples), inputs precomputed."""
    codec, predictor = system.codec, system.predictor
    with torch.inference_mode():
        padded = codec.pad(wav)
        features = predictor.features(padded)
        degraded_tokens = codec.encode(padded)
        tokens = argmax(predictor.predict(predictor.condition(padded), degraded_tokens))

    def stft_encoder() -> object:
        return predictor.features(padded), codec.encode(padded)

    def predict() -> object:
        with system.enhancer.predictor_precision():
            return argmax(predictor.predict(predictor.branch(features), degraded_tokens))

    return {
        "stft": lambda: predictor.features(padded),
        "encoder": lambda: codec.encode(padded),
        "stft_encoder": stft_encoder,
        "predictor": predict,
        "decoder": lambda: codec.decode(tokens, wav.shape[-1]),
        "total": lambda: system.enhancer.enhance_batch(wav),
    }


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each call; one warm-up each, then `repeats` rounds that visit every call in turn.
    Work queued on a GPU is waited for inside each timing."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    wait = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    with torch.inference_mode():
        for call in calls.values():
            call()
        wait()
        for _ in range(repeats):
            for name, call in calls.items():
                started = time.perf_counter()
                call()
                wait()
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_product(dtype: torch.dtype = torch.float32) -> Callable[[], torch.Tensor]:
    """A MATMUL_SIZE^2 matrix product in `dtype`, the yardstick of the bound: 2 * MATMUL_SIZE^3 FLOPs per call."""
    generator = torch.Generator().manual_seed(SEED)
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator).to(dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator).to(dtype)
    return lambda: a @ b


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# ------------------------------------------------------------------------------------------ length probe
def length_probe(config: dict, seconds: float, repeats: int, precision: str = "fp32") -> dict:
    """RTF and peak RSS of ParaGSE on one recording of `seconds` through the windowed Enhancer (this process).

    Warm-up is one window, so long recordings are not processed twice; recordings up to a minute are timed
    `repeats` times (median), longer ones once. Peak RSS is the process's high-water mark (models included).
    """
    system = build_system("parallel", config, precision=precision)
    rate = system.codec.sample_rate
    window = system.enhancer.window / rate
    system.enhancer.enhance(benchmark_audio(min(seconds, window), rate))
    audio = benchmark_audio(seconds, rate)
    runs = repeats if seconds <= 60 else 1
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        system.enhancer.enhance(audio)
        times.append(time.perf_counter() - started)
    return {"seconds": seconds, "rtf": statistics.median(times) / seconds, "peak_rss_mb": peak_rss_mb(),
            "runs": runs}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    Linux carries ru_maxrss across exec: a child started by a 2 GB parent reports at least the parent's 2 GB
    (measured). The kernel's per-address-space high-water mark (VmHWM) starts afresh at exec, so it is used where
    available; resource.getrusage(RUSAGE_SELF).ru_maxrss (KiB on Linux, bytes on macOS) otherwise.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_length_probes(args: argparse.Namespace) -> list[dict]:
    """One fresh process per length (`--_length_probe`), each reporting a JSON line."""
    results = []
    for seconds in args.lengths:
        command = [sys.executable, str(Path(__file__).resolve()), "--_length_probe", str(seconds),
                   "--threads", str(args.threads), "--repeats", str(args.repeats), "--precision", args.precision]
        if args.config:
            command += ["--config", str(args.config)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"length probe at {seconds} s failed (exit {done.returncode}): {done.stderr[-2000:]}")
        results.append(json.loads(lines[-1]))
    return results


# -------------------------------------------------------------------------------------------- measurements
def measure_systems(systems: list[System], quantized: System | None, wav: torch.Tensor, seconds: float,
                    repeats: int, matmul: Callable[[], object] | None = None
                    ) -> tuple[dict[str, dict[str, float]], float | None]:
    """RTF per stage for every system (and the quantised predictor's stages), and the seconds one `matmul` takes (None
    without one), all in the same interleaved rounds: this VM's speed drifts by 10-20 % within minutes, so a bound
    measured apart from the pipelines moved their ratio to it by as much."""
    calls: dict[str, Callable[[], object]] = {} if matmul is None else {"bound/matmul": matmul}
    for system in systems:
        for stage, call in stage_functions(system, wav).items():
            calls[f"{system.name}/{stage}"] = call
    if quantized is not None:
        stages = stage_functions(quantized, wav)
        calls["quantized/predictor"], calls["quantized/total"] = stages["predictor"], stages["total"]
    medians = interleaved_medians(calls, repeats)
    matmul_seconds = medians.pop("bound/matmul", None)
    table: dict[str, dict[str, float]] = {}
    for key, value in medians.items():
        name, stage = key.split("/")
        table.setdefault(name, {})[stage] = value / seconds
    return table, matmul_seconds


def system_gflops(system: System, wav: torch.Tensor, seconds: float, threads: int, add_lstm: bool) -> dict:
    """GFLOPs per audio second of each primitive stage and in total."""
    calls = stage_functions(system, wav)
    flops = {stage: counted_flops(calls[stage], threads) for stage in ("stft", "encoder", "predictor", "decoder")}
    if add_lstm:
        codec = system.codec
        # A token-aligned length L has L / hop + 1 MDCT frames, `downsample` of them per token frame.
        frames = (codec.pad(wav).shape[-1] // codec.hop_length + 1) // codec.downsample
        flops["predictor"] += lstm_flops(system.predictor, frames, wav.shape[0])
    flops["stft_encoder"] = flops["stft"] + flops["encoder"]
    flops["total"] = flops["stft"] + flops["encoder"] + flops["predictor"] + flops["decoder"]
    return {stage: value / seconds / 1e9 for stage, value in flops.items()}


def token_agreement(reference: inference.Enhancer, other: inference.Enhancer, wav: torch.Tensor) -> float:
    """Fraction of pipeline tokens that `other` predicts identically to `reference` on `wav`."""
    with torch.inference_mode():
        expected = reference.enhance_batch(wav)[1]
        got = other.enhance_batch(wav)[1]
    return float((expected == got).float().mean())


def batch_throughput(system: System, seconds: float, batch_sizes: list[int], repeats: int) -> list[dict]:
    """Audio seconds processed per wall second with B different equal-length clips stacked into one batch."""
    rate = system.codec.sample_rate
    calls = {}
    for size in batch_sizes:
        wav = torch.from_numpy(np.stack([benchmark_audio(seconds, rate, offset=i * rate) for i in range(size)]))
        wav = wav.to(system.enhancer.device)
        calls[str(size)] = lambda wav=wav: system.enhancer.enhance_batch(wav)
    medians = interleaved_medians(calls, repeats)
    return [{"batch_size": size, "audio_seconds_per_second": size * seconds / medians[str(size)]}
            for size in batch_sizes]


def run_benchmark(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    started_load = load_average()
    names = ["parallel"] + ([] if args.skip_serial else ["serial"])
    if config["enhancer"]["class"] != "ParaGSE":
        raise UserError(f"--config {args.config} builds a {config['enhancer']['class']}, not ParaGSE; the serial "
                        "baseline's config goes to --serial_config")
    systems = [build_system(name, config if name == "parallel" else load_config(args.serial_config),
                            precision=args.precision) for name in names]
    parallel = systems[0]
    rate = parallel.codec.sample_rate
    wav = torch.from_numpy(benchmark_audio(args.seconds, rate))[None]
    seconds = wav.shape[-1] / rate

    quantized = None
    if args.quantize:
        predictor = quantize_predictor(copy.deepcopy(parallel.predictor))
        quantized = System("quantized", parallel.codec, predictor, make_enhancer(parallel.codec, predictor, config))

    add_lstm = counter_misses_lstm()
    gflops = {s.name: system_gflops(s, wav, seconds, args.threads, add_lstm) for s in systems}
    rtf, matmul_seconds = measure_systems(systems, quantized, wav, seconds, args.repeats,
                                          matmul_product(MATMUL_DTYPES[args.precision]))
    matmul = 2 * MATMUL_SIZE**3 / matmul_seconds / 1e9
    result: dict = {
        "config": str(args.config or "config.json"), "threads": args.threads, "seconds": seconds,
        "precision": args.precision,
        "repeats": args.repeats, "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "allocator_keeps_freed_memory": args.allocator_tuned, "lstm_flops_added_analytically": add_lstm,
        "matmul_gflops": matmul,
        "params_parallel": parameter_counts(parallel), "gflops_per_second_parallel": gflops["parallel"]["total"],
        "gflops_stages_parallel": gflops["parallel"], "stages_parallel": rtf["parallel"],
        "rtf_parallel": rtf["parallel"]["total"],
        "rtf_bound": gflops["parallel"]["total"] / matmul,
    }
    if not args.skip_serial:
        serial = systems[1]
        result.update({
            "params_serial": parameter_counts(serial), "gflops_per_second_serial": gflops["serial"]["total"],
            "gflops_stages_serial": gflops["serial"], "stages_serial": rtf["serial"],
            "rtf_serial": rtf["serial"]["total"], "rtf_bound_serial": gflops["serial"]["total"] / matmul,
            "speedup": rtf["serial"]["total"] / rtf["parallel"]["total"],
            "speedup_predictor": rtf["serial"]["predictor"] / rtf["parallel"]["predictor"],
        })
    else:
        result.update({"params_serial": None, "gflops_per_second_serial": None, "stages_serial": None,
                       "rtf_serial": None, "speedup": None})
    if args.precision != "fp32":
        result["token_agreement_fp32"] = token_agreement(build_system("parallel", config).enhancer, parallel.enhancer,
                                                         wav)
    if quantized is not None:
        result.update({"rtf_quantized": rtf["quantized"]["total"],
                       "rtf_quantized_predictor": rtf["quantized"]["predictor"],
                       "token_agreement": token_agreement(parallel.enhancer, quantized.enhancer, wav)})
    result["batch_throughput"] = batch_throughput(parallel, args.seconds, args.batch_sizes, args.repeats)
    result["length_scaling"] = run_length_probes(args)
    result["load_average"] = {"start": started_load, "end": load_average()}
    return result


def checkpoint_stage_functions(enhancer: inference.Enhancer, wav: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Zero-argument calls for each stage of a trained enhancer's pipeline on `wav` (1, samples), each run as
    inference.Enhancer.enhance_batch runs it (the same calls, on the same threads)."""
    codec, predictor = enhancer.codec, enhancer.predictor
    audio = wav[0].numpy()
    # The stages see what the pipeline's see: the input at the pipeline's level (the blend's fill, and so how much
    # of the recording Griffin-Lim synthesises, depends on it).
    wav, _ = normalise_level(wav, enhancer.input_level_db, enhancer.sample_rate)
    with torch.inference_mode():
        padded = codec.pad(wav)
        degraded_tokens, analysis, frames = enhancer.encode_and_front(padded)
        with enhancer.predictor_precision():
            condition = predictor.branch.context(frames)
            group_logits = predictor.predict(condition, degraded_tokens)

    def context() -> torch.Tensor:
        with enhancer.predictor_precision():
            return predictor.branch.context(frames)

    def token_branches() -> torch.Tensor:
        with enhancer.predictor_precision():
            return predictor.predict(condition, degraded_tokens)

    def decoder() -> torch.Tensor:
        return codec.decode_latent(enhancer.latent(group_logits))

    with torch.inference_mode():
        decoded = decoder()
    stages = {
        "encoder_and_front": lambda: enhancer.encode_and_front(padded),
        "context": context,
        "token_branches": token_branches,
        "decoder": decoder,
        "vocoder": lambda: codec.synthesise(decoded, wav.shape[-1]),
    }
    blend = enhancer.blend
    if blend is not None:
        with torch.inference_mode():
            # The pipeline has the token distributions already (the decoder's); the blend only reads them.
            intact = token_probability(enhancer.probabilities(group_logits), degraded_tokens)
            keep, fill = blend.band_gains(decoded, analysis, intact)
            needed = blend.needed_frames(fill)
            generated = codec.griffin_lim(decoded, wav.shape[-1], needed)

        def blend_stage() -> torch.Tensor:
            keep, fill = blend.band_gains(decoded, analysis, intact)
            return blend.mix(analysis, keep, fill, generated, padded.shape[-1])

        # As the pipeline runs it: only the chunks the blend takes some of.
        stages["vocoder"] = lambda: codec.griffin_lim(decoded, wav.shape[-1], needed)
        stages["blend"] = blend_stage
    return stages | {"total": lambda: enhancer.enhance(audio)}


def run_checkpoint_benchmark(args: argparse.Namespace) -> dict:
    """Stage RTFs of a trained enhancer (and, with --peers, the peers' RTFs) on the same clip, interleaved."""
    torch.set_num_threads(args.threads)
    started_load = load_average()
    enhancer = inference.Enhancer.load(args.checkpoint, device="cpu", precision=args.precision).parallelize()
    wav = torch.from_numpy(benchmark_audio(args.seconds, enhancer.sample_rate))[None]
    seconds = wav.shape[-1] / enhancer.sample_rate
    calls = {f"checkpoint/{stage}": call for stage, call in checkpoint_stage_functions(enhancer, wav).items()}
    if args.peers:
        if enhancer.sample_rate != peers.SAMPLE_RATE:
            raise UserError(f"--peers needs a {peers.SAMPLE_RATE} Hz model, not {enhancer.sample_rate} Hz")
        try:
            loaded = peers.load_peers(list(peers.PEERS))
        except ImportError as e:
            raise UserError(str(e)) from e
        audio = wav[0].numpy()
        calls |= {f"peers/{peer.name}": (lambda peer=peer: peer(audio)) for peer in loaded.values()}
    medians = interleaved_medians(calls, args.repeats)
    stages = {key.split("/")[1]: value / seconds for key, value in medians.items() if key.startswith("checkpoint/")}
    agreement = None
    if args.precision != "fp32":
        agreement = token_agreement(inference.Enhancer.load(args.checkpoint, device="cpu").parallelize(), enhancer,
                                    wav)
    return {
        "threads": args.threads, "seconds": seconds, "repeats": args.repeats, "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "allocator_keeps_freed_memory": args.allocator_tuned,
        "checkpoint": {"path": str(args.checkpoint), "decoding": enhancer.decoding,
                       "temperature": enhancer.temperature, "codec": type(enhancer.codec).__name__,
                       "blend": enhancer.blend is not None,
                       "precision": args.precision, "rtf": stages["total"], "stages": stages,
                       "token_agreement_fp32": agreement},
        "peers": {key.split("/")[1]: value / seconds for key, value in medians.items() if key.startswith("peers/")},
        "load_average": {"start": started_load, "end": load_average()},
    }


def checkpoint_report(r: dict) -> str:
    c = r["checkpoint"]
    lines = [f"## Speed of {c['path']} at {r['threads']} threads, {r['seconds']:.1f} s of audio "
             f"({c['codec']}, {c['decoding']} decoding, predictor in {c['precision']}"
             f"{', blended with the input' if c.get('blend') else ''})", "", "| stage | RTF |",
             "|---|---:|"]
    lines += [f"| {stage} | {value:.4f} |" for stage, value in c["stages"].items()]
    if c["token_agreement_fp32"] is not None:
        lines.append(f"\n- tokens identical to float32: {100 * c['token_agreement_fp32']:.2f} %")
    if r["peers"]:
        lines += ["", "| peer | RTF |", "|---|---:|"] + [f"| {n} | {v:.4f} |" for n, v in r["peers"].items()]
    lines.append(f"\n- load average (1 min) at start / end: {r['load_average']['start']} / {r['load_average']['end']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- report
def markdown_report(r: dict) -> str:
    """The results as markdown tables."""
    systems = [("ParaGSE", "parallel")] + ([("serial", "serial")] if r.get("stages_serial") else [])
    header = "| | " + " | ".join(label for label, _ in systems) + " |"
    rule = "|---|" + "---:|" * len(systems)
    lines = [f"## Speed at {r['threads']} threads, {r['seconds']:.1f} s of audio (config {r['config']}, predictors "
             f"in {r['precision']})", "",
             header, rule]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    for part in ("predictor", "codec_encoder", "quantizer", "codec_decoder", "total"):
        row(f"parameters: {part} (M)", [f"{r[f'params_{key}'][part] / 1e6:.2f}" for _, key in systems])
    for stage in ("stft", "encoder", "predictor", "decoder", "total"):
        row(f"GFLOPs per audio second: {stage}",
            [f"{r[f'gflops_stages_{key}'][stage]:.2f}" for _, key in systems])
    for stage in STAGES:
        row(f"RTF: {stage}", [f"{r[f'stages_{key}'][stage]:.4f}" for _, key in systems])
    lines.append("")
    if r.get("speedup") is not None:
        lines.append(f"- parallel/serial speed ratio (serial RTF / ParaGSE RTF): **{r['speedup']:.2f}x** "
                     f"(predictor stage alone: {r['speedup_predictor']:.2f}x)")
    lines += [f"- measured {r['precision']} matmul ({MATMUL_SIZE}^2): {r['matmul_gflops']:.1f} GFLOP/s; implied RTF "
              "lower bound "
              f"for ParaGSE: {r['rtf_bound']:.4f} (measured {r['rtf_parallel']:.4f}, "
              f"{r['rtf_parallel'] / r['rtf_bound']:.2f}x the bound)"]
    if r.get("token_agreement_fp32") is not None:
        lines.append(f"- tokens identical to float32: {100 * r['token_agreement_fp32']:.2f} %")
    if "rtf_quantized" in r:
        lines.append(f"- int8 dynamic quantisation of the predictor: RTF {r['rtf_quantized']:.4f} "
                     f"(predictor {r['rtf_quantized_predictor']:.4f} vs fp32 {r['stages_parallel']['predictor']:.4f}),"
                     f" tokens identical to fp32: {100 * r['token_agreement']:.2f} %")
    lines.append(f"- load average (1 min) at start / end: {r['load_average']['start']} / {r['load_average']['end']}")
    lines += ["", "| recording length (s) | RTF | peak RSS (MB) |", "|---:|---:|---:|"]
    lines += [f"| {x['seconds']:g} | {x['rtf']:.4f} | {x['peak_rss_mb']:.0f} |" for x in r["length_scaling"]]
    lines += ["", "| batch size | audio seconds per second | RTF per clip-second |", "|---:|---:|---:|"]
    lines += [f"| {x['batch_size']} | {x['audio_seconds_per_second']:.2f} | {1 / x['audio_seconds_per_second']:.4f} |"
              for x in r["batch_throughput"]]
    return "\n".join(lines)


def positive_list(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        values = [kind(v) for v in text.split(",") if v.strip()]
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive numbers, got {text!r}")
        return values
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="configuration (default: config.json, the paper configuration)")
    p.add_argument("--threads", type=int, default=2, help="intra-op CPU threads")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length for the stage timings")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (medians are reported)")
    p.add_argument("--lengths", type=positive_list(float), default=[5, 10, 60, 600],
                   help="recording lengths in seconds for the length scaling")
    p.add_argument("--batch_sizes", type=positive_list(int), default=[1, 4], help="batch sizes for throughput")
    p.add_argument("--quantize", action="store_true", help="also measure int8 dynamic quantisation")
    p.add_argument("--precision", choices=inference.PRECISIONS, default="fp32",
                   help="bf16: every token predictor under bfloat16 autocast, the bound from a bfloat16 matmul")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--serial_config", default=REPO_ROOT / "configs" / "serial.json",
                   help="the serial baseline's configuration (default: configs/serial.json, the paper's)")
    p.add_argument("--skip_serial", action="store_true", help="time ParaGSE only")
    p.add_argument("--checkpoint", nargs="?", const=inference.DEFAULT_ENHANCER, type=Path,
                   help="time this trained enhancer's pipeline instead (no value: the shipped demo model)")
    p.add_argument("--peers", action="store_true", help="with --checkpoint: also time the peers of peers.py")
    p.add_argument("--_length_probe", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.seconds <= 0:
        p.error("--threads and --repeats must be at least 1 and --seconds positive")
    if args.peers and args.checkpoint is None:
        p.error("--peers needs --checkpoint (the peers are compared with a trained model)")
    if args.quantize and args.precision != "fp32":
        p.error("--quantize times an int8 predictor beside the float one; use it with --precision fp32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.allocator_tuned = cpu_speed.enable()  # as inference.py's command line does
    try:
        if args.json:
            if args.json.is_dir():
                raise UserError(f"--json {args.json} is a folder; give a file name such as {args.json / 'bench.json'}")
            require_writable(args.json.parent, "--json")  # before the minutes of measuring
        if args._length_probe is not None:
            torch.set_num_threads(args.threads)
            with torch.inference_mode():
                print(json.dumps(length_probe(load_config(args.config), args._length_probe, args.repeats,
                                              args.precision)))
            return 0
        result = run_checkpoint_benchmark(args) if args.checkpoint else run_benchmark(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(checkpoint_report(result) if args.checkpoint else markdown_report(result))
    if args.json:
        atomic_write(args.json, (json.dumps(result, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
