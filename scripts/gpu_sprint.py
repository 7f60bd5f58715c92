"""Ten minutes of one GPU turned into evidence: CUDA tests, training and inference speed, a larger demo model.

    python scripts/make_gpu_pack.py                                   # here: pack/ (data and wheels, < 60 MiB)
    python scripts/gpu_sprint.py --output_dir OUT --pack pack --minutes 9 --device cuda   # there
    python scripts/gpu_sprint.py --output_dir /tmp/sprint --smoke --device cpu            # anywhere, ~2 minutes

First the pack's wheels are installed into a temporary folder (a bare GPU machine has PyTorch but not soundfile,
soxr, librosa or pystoi). Then four stages run in order, each boxed in time and each writing its result into
OUT/report.json before the next begins, so a run cut short still reports what it did:

1. `cuda_tests`: the test suite's CUDA tests (tests/test_devices.py, `-k cuda`), pass/fail/skip per test.
2. `train_throughput`: optimiser steps per second at the paper configuration (codec: batch 48 x 7,960 samples with
   the discriminator; ParaGSE: batch 32 x 31,960; the serial baseline likewise), fp32 against bf16 autocast, and
   torch.compile on top of bf16 where it runs (GPU only); the peak GPU memory, and the share of each step spent
   waiting for the data loader (real pack data, degraded on the fly by worker processes). The larger demo
   enhancer of stage 4 is measured too, which sizes its run.
3. `inference_rtf`: real-time factor on the device of the paper pipeline, ParaGSE and serial, stage by stage
   (benchmark.py's measurement), with batches of clips and with a long recording's windows batched.
4. `training`: for the rest of the budget, the larger demo enhancer (configs/gpu_demo_paragse.json), grown from the
   shipped demo model (`--init_from`: its weights, the token branches' new conformer blocks from their initialisation),
   on the shipped demo codec's tokens from the pack's speech and noise, stopped at the deadline (SIGTERM: train.py
   saves), exported
   at float16 as OUT/gpu_paragse.pt (in parts of at most 15 MiB if larger; checkpoint.load joins them), validated
   on the pack's validation pairs beside the shipped demo model (ESTOI, and PESQ where pesq imports), with its
   OUT/log.csv.

What comes back from such a machine is at most 8 files of at most 16 MiB each, 64 MiB in all, no more than two
folders down: OUT holds report.json, log.csv, sprint.log and the weights (at most 4 parts), and the script checks
them against those limits at the end (`report["output_files"]`).

--smoke runs every stage at a tiny scale (the tiny test configs, a few steps, a pack made on the fly from
examples/ unless --pack is given); with --device cpu it needs no GPU and takes a couple of minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The project's modules and make_gpu_pack; imported only inside functions, after the pack's wheels are installed.
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
MIB = 2**20
RETURN_LIMITS = {"files": 8, "file_bytes": 16 * MIB, "total_bytes": 64 * MIB, "depth": 2}
PART_BYTES = 15 * MIB
RETURN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
VERBOSE_RESULT = re.compile(r"^tests/\S+::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", re.MULTILINE)  # pytest -v lines
SPRINT_CONFIG = REPO / "configs" / "gpu_demo_paragse.json"
SHIPPED_CODEC = REPO / "pretrained" / "demo_codec.pt"
SHIPPED_ENHANCER = REPO / "pretrained" / "demo_paragse.pt"
WEIGHTS_NAME = "gpu_paragse.pt"

# Share of the budget each stage may use (the training stage takes what the others leave).
STAGE_SHARES = {"cuda_tests": 0.14, "train_throughput": 0.32, "inference_rtf": 0.12}
RESERVE_SECONDS = 45  # export, validation and the report after training


# ------------------------------------------------------------------------------------------------ helpers
def now() -> float:
    return time.monotonic()


def write_json(path: Path, value: dict) -> None:
    """Atomically (a run killed mid-write keeps the previous report)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


NEEDED_MODULES = ("soundfile", "soxr", "librosa", "pystoi")


def install_wheels(pack: Path, site: Path) -> list[str]:
    """pip install the pack's wheels into `site` (no index, no dependencies: the pack holds each one) and put it
    first on sys.path and PYTHONPATH, so this process and every child import them. Where every needed module
    imports already (a development machine), nothing is installed."""
    import importlib.util

    wheels = sorted((pack / "wheels").glob("*.whl"))
    if all(importlib.util.find_spec(name) for name in NEEDED_MODULES):
        return []
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return [w.name for w in wheels]


def _to_wav(job: tuple[str, str]) -> None:
    import soundfile as sf

    audio, rate = sf.read(job[0], dtype="int16")
    Path(job[1]).parent.mkdir(parents=True, exist_ok=True)
    sf.write(job[1], audio, rate, subtype="PCM_16")


def unpack(pack: Path, target: Path) -> Path:
    """The pack's compressed audio decoded once into WAV (on every core): each dataset built later preloads its
    files, and decoding an hour of Opus per build would cost tens of seconds each time."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(str(f), str((target / f.relative_to(pack)).with_suffix(".wav")))
            for folder in ("speech", "noise", "rir") for f in sorted((pack / folder).rglob("*"))
            if f.suffix in (".ogg", ".flac", ".wav")]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(_to_wav, jobs, chunksize=32))
    (target / "valid").symlink_to((pack / "valid").resolve())
    return target


def run_boxed(command: list[str], timeout: float, **popen: object) -> int | None:
    """Run `command` in the repository, killing it and everything it started once `timeout` seconds have passed;
    its exit code, or None if it was cut off."""
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, **popen)
    try:
        return process.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None


def run_child(stage: str, options: dict, timeout: float, scratch: Path) -> dict:
    """Run one stage in a fresh process (its own CUDA context; a hang or a slow compile is cut off at `timeout`)
    and return what it wrote, marked cut_short if it ran out of time."""
    result_file = scratch / f"{stage}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--_stage", stage, "--_options", json.dumps(options),
               "--_result", str(result_file)]
    code = run_boxed(command, timeout)
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    result["exit_code"], result["cut_short"] = code, code is None
    return result


# ---------------------------------------------------------------------------------------- 1. CUDA tests
def cuda_tests(timeout: float, scratch: Path) -> dict:
    """Each CUDA test's outcome: from pytest's JUnit report, or, if the stage's time ran out before pytest wrote it,
    from the verbose lines of the tests that had finished."""
    import xml.etree.ElementTree as ElementTree

    junit, output = scratch / "junit.xml", scratch / "pytest.out"
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/test_devices.py", "-k", "cuda",
               f"--junitxml={junit}"]
    started = now()
    with open(output, "w") as sink:
        code = run_boxed(command, timeout, stdout=sink, stderr=subprocess.STDOUT)
    text = output.read_text(errors="replace")
    tests = {}
    if junit.is_file():
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                    message = (child.get("message") or "")[:300]
            tests[case.get("name")] = {"outcome": outcome, "message": message}
    else:
        for name, outcome in VERBOSE_RESULT.findall(text):
            tests[name] = {"outcome": outcome.lower(), "message": ""}
    return {"tests": tests, "exit_code": code, "cut_short": code is None, "seconds": round(now() - started, 1),
            "passed": sum(t["outcome"] == "passed" for t in tests.values()),
            "failed": sum(t["outcome"] in ("failed", "error") for t in tests.values()),
            "skipped": sum(t["outcome"] == "skipped" for t in tests.values()), "output_tail": text[-1500:]}


# ---------------------------------------------------------------------------------- 2. training throughput
def throughput_plan(smoke: bool, device: str) -> list[dict]:
    """The measurements of stage 2, most important first (a cut-short stage still has these)."""
    gpu = device.startswith("cuda")
    if smoke:
        base = {"steps": 2, "warmup": 1, "seconds": 10.0}
        plan = [{"name": "codec", "kind": "codec", "config": "configs/tiny.json", "batch": 2, "segment": 7960},
                {"name": "paragse", "kind": "enhancer", "config": "configs/tiny.json", "batch": 2, "segment": 15960},
                {"name": "serial", "kind": "enhancer", "config": "configs/tiny_serial.json", "batch": 2,
                 "segment": 15960},
                {"name": "demo_large", "kind": "enhancer", "config": "configs/gpu_demo_paragse.json", "batch": 2,
                 "segment": 15960, "codec": str(SHIPPED_CODEC)}]
    else:
        base = {"steps": 60, "warmup": 3, "seconds": 8.0}
        # Batch and segment None: each config's own (the paper's: codec 48 x 7,960, predictors 32 x 31,960).
        plan = [{"name": "codec", "kind": "codec", "config": "config.json", "batch": None, "segment": None},
                {"name": "paragse", "kind": "enhancer", "config": "config.json", "batch": None, "segment": None},
                {"name": "serial", "kind": "enhancer", "config": "configs/serial.json", "batch": None,
                 "segment": None},
                {"name": "demo_large", "kind": "enhancer", "config": "configs/gpu_demo_paragse.json", "batch": None,
                 "segment": None, "codec": str(SHIPPED_CODEC)}]
    runs = []
    for item in plan:
        for precision in ["bf16"] if item["name"] == "demo_large" else ["bf16", "fp32"]:
            runs.append(base | item | {"precision": precision, "compile": False})
    # Compiling can take a minute or more: last, so that a slow compile cannot cost the plain measurements.
    return runs + [base | item | {"precision": "bf16", "compile": True} for item in plan
                   if gpu and item["name"] in ("paragse", "codec")]


def measure_training(item: dict, device_name: str, pack: Path, workers: int) -> dict:
    """Steps per second of one stage's training step on real pack data (warm-up steps excluded), the share of the
    timed wall time spent waiting for the next batch, and the peak GPU memory."""
    from contextlib import nullcontext

    import torch

    import checkpoint
    import dataset as data
    import train
    from models import build_codec
    from models.conformer import recurrences_left_eager
    from runs import make_loader
    from utils import load_config, resolve_device

    device = resolve_device(device_name)
    config = load_config(REPO / item["config"])
    section = "codec_training" if item["kind"] == "codec" else "enhancer_training"
    batch = item["batch"] or config[section]["batch_size"]
    segment = item["segment"] or config[section]["segment_length"]
    config[section] |= {"batch_size": batch, "segment_length": segment}
    rate, seed = config["sample_rate"], config["data"]["seed"]
    torch.manual_seed(0)
    if item["kind"] == "codec":
        config["codec_training"]["discriminator_start_step"] = 0  # the discriminator in every timed step
        stage = train.CodecStage(config, device, 1, 10**6)
        dataset = data.CleanSegmentDataset(pack / "speech", segment, seed, rate)
    else:
        if item.get("codec"):
            codec_payload, source = checkpoint.load(item["codec"], "codec"), item["codec"]
        else:  # the paper codec, untrained: its speed is all that is measured
            codec_payload, source = checkpoint.codec_payload(build_codec(config["codec"], rate)), "untrained codec"
        stage = train.EnhancerStage(config, device, 1, 10**6, codec_payload, source)
        rir = pack / "rir" if (pack / "rir").is_dir() else None
        dataset = data.DegradedDataset(pack / "speech", pack / "noise", rir, config["data"], segment, seed, rate)
    stage.wrap()
    if item["compile"]:
        stage.model_ddp = torch.compile(recurrences_left_eager(stage.model_ddp))
        if getattr(stage, "discriminator", None) is not None:
            stage.discriminator_ddp = torch.compile(stage.discriminator_ddp)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if item["precision"] == "bf16" else nullcontext()
    cuda = device.type == "cuda"
    wait = torch.cuda.synchronize if cuda else (lambda: None)
    loader = iter(make_loader(dataset, batch, seed, 0, 0, 1, workers))
    data_seconds, step_seconds, started_all = 0.0, [], now()
    warmup_seconds = None
    for step in range(item["warmup"] + item["steps"]):
        started = now()
        batch_data = next(loader)
        fetched = now()
        batch_data = [b.to(device, non_blocking=True) for b in batch_data] if isinstance(batch_data, list) else \
            batch_data.to(device, non_blocking=True)
        stage.step(batch_data, step, amp, lambda value: bool(torch.isfinite(value)))
        wait()
        if step == item["warmup"] - 1:
            warmup_seconds = now() - started_all
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
        elif step >= item["warmup"]:
            data_seconds += fetched - started
            step_seconds.append(now() - started)
            if sum(step_seconds) > item["seconds"]:
                break
    timed = sum(step_seconds)
    return {"name": item["name"], "config": item["config"], "precision": item["precision"],
            "compile": item["compile"], "batch": batch, "segment": segment, "steps": len(step_seconds),
            "steps_per_second": round(len(step_seconds) / timed, 3),
            "median_step_seconds": round(statistics.median(step_seconds), 4),
            "data_wait_fraction": round(data_seconds / timed, 3),
            "warmup_seconds": round(warmup_seconds or 0.0, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
            "parameters_m": round(sum(p.numel() for p in stage.model.parameters()) / 1e6, 2)}


def stage_train_throughput(options: dict, result_file: Path) -> None:
    results = {"device": options["device"], "workers": options["workers"], "runs": []}
    deadline = now() + options["seconds"]
    for item in throughput_plan(options["smoke"], options["device"]):
        if now() > deadline - 5:
            results["not_run"] = results.get("not_run", []) + [f"{item['name']} {item['precision']}"]
            continue
        try:
            item["seconds"] = min(item["seconds"], max(2.0, deadline - now() - 10))
            results["runs"].append(measure_training(item, options["device"], Path(options["pack"]),
                                                    options["workers"]))
        except Exception as e:  # one failing configuration (e.g. torch.compile) must not lose the others
            results["runs"].append({"name": item["name"], "precision": item["precision"], "compile": item["compile"],
                                    "error": f"{type(e).__name__}: {str(e)[:300]}"})
        write_json(result_file, results)
    write_json(result_file, results)


# ---------------------------------------------------------------------------------------- 3. inference RTF
def stage_inference_rtf(options: dict, result_file: Path) -> None:
    import numpy as np
    import torch

    import benchmark
    from utils import load_config, resolve_device

    device = resolve_device(options["device"])
    smoke = options["smoke"]
    configs = ("configs/tiny.json", "configs/tiny_serial.json") if smoke else ("config.json", "configs/serial.json")
    seconds, repeats = (2.0, 1) if smoke else (10.0, 5)
    results: dict = {"device": str(device), "seconds": seconds, "repeats": repeats}
    systems = [benchmark.build_system(name, load_config(REPO / path), device)
               for name, path in zip(("parallel", "serial"), configs)]
    rate = systems[0].codec.sample_rate
    wav = torch.from_numpy(benchmark.benchmark_audio(seconds, rate))[None].to(device)
    stages, _ = benchmark.measure_systems(systems, None, wav, wav.shape[-1] / rate, repeats)
    results |= {"stages_parallel": stages["parallel"], "stages_serial": stages["serial"],
                "rtf_parallel": stages["parallel"]["total"], "rtf_serial": stages["serial"]["total"],
                "serial_over_parallel": stages["serial"]["total"] / stages["parallel"]["total"]}
    write_json(result_file, results)
    sizes = [1, 4] if smoke else [1, 8, 32]
    results["batch_throughput"] = {s.name: benchmark.batch_throughput(s, seconds, sizes, repeats) for s in systems}
    write_json(result_file, results)
    # A long recording's windows through the predictor in batches (inference.py --batch_size).
    long_seconds = 8.0 if smoke else 120.0
    audio = benchmark.benchmark_audio(long_seconds, rate)
    windowed = {}
    for batch_size in ([1, 4] if smoke else [1, 16]):
        system = benchmark.build_system("parallel", load_config(REPO / configs[0]), device, batch_size)
        system.enhancer.enhance(audio[: rate * 2])
        times = []
        for _ in range(1 if smoke else 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = now()
            system.enhancer.enhance(audio)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(now() - started)
        windowed[str(batch_size)] = float(np.median(times)) / long_seconds
    results["windowed_rtf"] = {"seconds": long_seconds, "by_batch_size": windowed}
    write_json(result_file, results)


# --------------------------------------------------------------------------------------------- 4. training
def sprint_config(smoke: bool, scratch: Path) -> Path:
    """The larger demo enhancer's config; for a smoke run shrunk to a tiny batch and segment, one data worker."""
    if not smoke:
        return SPRINT_CONFIG
    config = json.loads(SPRINT_CONFIG.read_text())
    config["base"] = str(SPRINT_CONFIG.parent / config.get("base", "../config.json"))
    config.setdefault("enhancer_training", {}).update({"batch_size": 2, "segment_length": 15960, "warmup_steps": 2})
    config.setdefault("run", {})["log_every"] = 1
    config.setdefault("data", {})["num_workers"] = 1
    path = scratch / "smoke_gpu_demo_paragse.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def planned_steps(throughput: dict, seconds: float, smoke: bool) -> int:
    """How many steps fit in `seconds` at the measured bf16 rate of the sprint model (minus start-up)."""
    if smoke:
        return 3
    rates = [r["steps_per_second"] for r in throughput.get("runs", []) if r.get("name") == "demo_large"
             and "steps_per_second" in r]
    rate = rates[0] if rates else 4.0  # a guess if stage 2 did not get that far
    return max(50, int(0.9 * rate * max(0.0, seconds - 40)))


def train_sprint_model(options: dict, throughput: dict, deadline: float, scratch: Path, out: Path) -> dict:
    pack, smoke = Path(options["pack"]), options["smoke"]
    config = sprint_config(smoke, scratch)
    run_dir = scratch / "run"
    steps = planned_steps(throughput, deadline - now(), smoke)
    # Grown from the shipped model (its weights; the token branches' conformer blocks new): minutes of a GPU build on
    # its 18.8 CPU-hours instead of starting again from nothing.
    command = [sys.executable, "train.py", "--stage", "enhancer", "--config", str(config), "--codec",
               str(SHIPPED_CODEC), "--init_from", str(SHIPPED_ENHANCER), "--checkpoint_dir", str(run_dir),
               "--train_dir", str(pack / "speech"),
               "--noise_dir", str(pack / "noise"), "--device", options["device"], "--max_steps", str(steps),
               "--keep_last", "1"]
    if (pack / "rir").is_dir():
        command += ["--rir_dir", str(pack / "rir")]
    started = now()
    with open(scratch / "train.out", "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=max(1.0, deadline - now()))
            stopped = "finished"
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)  # train.py saves a checkpoint and exits
            try:
                process.wait(timeout=30)
                stopped = "deadline"
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                stopped = "killed"
    result: dict = {"config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config.name),
                    "planned_steps": steps, "stopped": stopped, "exit_code": process.returncode,
                    "train_seconds": round(now() - started, 1),
                    "train_output_tail": (scratch / "train.out").read_text()[-1500:]}
    if (run_dir / "log.csv").is_file():
        shutil.copy(run_dir / "log.csv", out / "log.csv")
    checkpoints = sorted(run_dir.glob("checkpoint_*.pt"))
    if not checkpoints:
        result["error"] = "no checkpoint was written"
        return result
    import checkpoint

    trained = checkpoint.load(checkpoints[-1], "enhancer")
    result["steps"] = trained["training"]["step"]
    result["compute_hours"] = round(trained["training"]["compute_seconds"] / 3600, 4)
    result["parameters_m"] = round(sum(v.numel() for v in trained["model"].values()) / 1e6, 2)
    del trained
    # Exported beside a copy of the codec it names, so the file finds it wherever the pair lands (pretrained/).
    export_dir = scratch / "export"
    export_dir.mkdir(exist_ok=True)
    shutil.copy(SHIPPED_CODEC, export_dir / SHIPPED_CODEC.name)
    checkpoint.export(checkpoints[-1], export_dir / WEIGHTS_NAME, half=True, name_codec=export_dir / SHIPPED_CODEC.name,
                      part_bytes=PART_BYTES)
    written = [export_dir / WEIGHTS_NAME] if (export_dir / WEIGHTS_NAME).is_file() else \
        checkpoint.part_files(export_dir / WEIGHTS_NAME)
    for f in written:  # handed back before validating, so that a failing validation cannot lose the weights
        shutil.copy(f, out / f.name)
    result["weights"] = [f.name for f in written]
    try:
        result["validation"] = validate_pair(export_dir / WEIGHTS_NAME, pack / "valid", options["device"])
    except Exception as e:  # the report and the weights must still come back
        result["validation"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return result


def validate_pair(new_model: Path, valid: Path, device: str) -> dict:
    """Mean ESTOI (and wide-band PESQ where pesq imports) of the new and the shipped model on the pack's pairs."""
    import numpy as np
    from pystoi import stoi

    import inference
    from utils import find_audio_files, load_audio

    try:
        from pesq import pesq
    except ImportError:
        pesq = None
    pairs = [f for f in find_audio_files(valid / "degraded") if (valid / "clean" / f).is_file()]
    scores: dict = {}
    for name, path in (("new", new_model), ("shipped", SHIPPED_ENHANCER), ("input", None)):
        enhancer = inference.Enhancer.load(path, device=device) if path is not None else None
        estoi, wb_pesq = [], []
        for relative in pairs:
            degraded = load_audio(valid / "degraded" / relative, 16000)[0]
            clean = load_audio(valid / "clean" / relative, 16000)[0]
            output = enhancer.enhance(degraded).audio if enhancer is not None else degraded
            length = min(len(output), len(clean))
            estoi.append(stoi(clean[:length], output[:length], 16000, extended=True))
            if pesq is not None:
                try:
                    wb_pesq.append(pesq(16000, clean[:length], output[:length], "wb"))
                except Exception:  # pesq refuses some inputs (no utterance found); the mean skips them
                    pass
        scores[name] = {"estoi": round(float(np.mean(estoi)), 4),
                        "pesq": round(float(np.mean(wb_pesq)), 3) if wb_pesq else None}
    return {"pairs": len(pairs), "scores": scores, "pesq_available": pesq is not None}


# ------------------------------------------------------------------------------------------- output check
def check_output(out: Path) -> dict:
    """What OUT holds against what a lent machine hands back."""
    files = [f for f in out.rglob("*") if f.is_file()]
    problems = []
    if len(files) > RETURN_LIMITS["files"]:
        problems.append(f"{len(files)} files (at most {RETURN_LIMITS['files']})")
    total = sum(f.stat().st_size for f in files)
    if total > RETURN_LIMITS["total_bytes"]:
        problems.append(f"{total / MIB:.1f} MiB in all (at most 64)")
    for f in files:
        relative = f.relative_to(out)
        if f.stat().st_size > RETURN_LIMITS["file_bytes"]:
            problems.append(f"{relative}: {f.stat().st_size / MIB:.1f} MiB (at most 16)")
        if len(relative.parts) - 1 > RETURN_LIMITS["depth"]:
            problems.append(f"{relative}: more than two folders down")
        if not all(RETURN_NAME.match(part) for part in relative.parts):
            problems.append(f"{relative}: a name with other characters than letters, digits, '.', '_', '-'")
    return {"files": sorted(str(f.relative_to(out)) for f in files), "total_bytes": total, "problems": problems}


# ----------------------------------------------------------------------------------------------------- main
def sprint(args: argparse.Namespace) -> int:
    started = now()
    budget = args.minutes * 60
    deadline = started + budget
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_sprint_"))
    report: dict = {"device": args.device, "smoke": args.smoke, "minutes": args.minutes}
    report_path = out / "report.json"
    write_json(report_path, report)
    if args.pack is None:
        if not args.smoke:
            print("error: --pack is required (make it with scripts/make_gpu_pack.py); --smoke makes one from examples/",
                  file=sys.stderr)
            return 2
        from make_gpu_pack import examples_pack

        examples_pack(scratch / "pack")
    report["wheels"] = install_wheels(args.pack or scratch / "pack", scratch / "site")
    pack = unpack(args.pack or scratch / "pack", scratch / "data")
    report["setup_seconds"] = round(now() - started, 1)
    write_json(report_path, report)
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    options = {"device": args.device, "smoke": args.smoke, "pack": str(pack), "workers": 1 if args.smoke else workers}

    report["cuda_tests"] = cuda_tests(STAGE_SHARES["cuda_tests"] * budget, scratch)
    write_json(report_path, report)
    share = STAGE_SHARES["train_throughput"] * budget
    report["train_throughput"] = run_child("train_throughput", options | {"seconds": share - 10}, share, scratch)
    write_json(report_path, report)
    share = STAGE_SHARES["inference_rtf"] * budget
    report["inference_rtf"] = run_child("inference_rtf", options, share, scratch)
    write_json(report_path, report)
    report["training"] = train_sprint_model(options, report["train_throughput"], deadline - RESERVE_SECONDS, scratch,
                                            out)
    report["seconds"] = round(now() - started, 1)
    write_json(report_path, report)
    report["output_files"] = check_output(out)
    write_json(report_path, report)
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({k: report[k] for k in ("seconds", "output_files")}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", type=Path)
    p.add_argument("--pack", type=Path, help="the folder scripts/make_gpu_pack.py wrote")
    p.add_argument("--minutes", type=float, default=9.0, help="the whole run's budget")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--smoke", action="store_true", help="every stage at a tiny scale")
    p.add_argument("--_stage", help=argparse.SUPPRESS)
    p.add_argument("--_options", help=argparse.SUPPRESS)
    p.add_argument("--_result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._stage:
        stage = {"train_throughput": stage_train_throughput, "inference_rtf": stage_inference_rtf}[args._stage]
        stage(json.loads(args._options), args._result)
        return 0
    if args.output_dir is None:
        p.error("--output_dir is required")
    if args.minutes <= 0:
        p.error("--minutes must be positive")
    return sprint(args)


if __name__ == "__main__":
    sys.exit(main())
