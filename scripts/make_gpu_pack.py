"""The pack a short GPU run needs beside the repository: speech, noise, room responses, validation pairs, wheels.

    python scripts/make_gpu_pack.py [--corpus data/corpus] [--valid_sets data/valid_sets] [--output pack]
                                    [--limit_mib 60] [--speech_share 0.7]
    python scripts/make_gpu_pack.py --from_examples --output /tmp/pack     # tiny, from examples/ (no wheels)

A GPU machine lent for a few minutes is bare (PyTorch, but no soundfile, soxr, librosa or pystoi) and receives the
working tree plus carried paths, at most 64 MiB in all. So the pack holds, for Python 3.12 on manylinux x86-64, the
wheels of every package `scripts/gpu_sprint.py` needs that such a machine lacks, and the data of the run in a
compressed form soundfile reads: training speech and noise as Ogg Opus (about 4.6 kB a second), room impulse
responses and validation pairs as FLAC (lossless: they are short). The tracked tree and the pack together stay under
--limit_mib; speech and noise share what the wheels, responses and validation pairs leave, taken round-robin over
their recording groups (speaker or source folders) so a subset keeps every speaker and kind of noise.

Layout: speech/<group>/*.ogg, noise/<group>/*.ogg, rir/*.flac, valid/degraded/..., valid/clean/... (paired by
relative path), wheels/*.whl, pack.json (what it holds and its sizes). The folder is ignored by git (/pack/); carry
it to the GPU machine. Prints the sizes.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the project's modules

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from utils import REPO_ROOT, UserError, find_audio_files, load_audio, run_command  # noqa: E402

SAMPLE_RATE = 16000
MIB = 2**20
# What gpu_sprint.py and the training code import that the GPU machine's image lacks (its image has torch, numpy,
# scipy, numba, scikit-learn, tensorboard, tqdm, onnxruntime, pytest): the packages, and those they need in turn.
WHEELS = ("soundfile", "cffi", "pycparser", "soxr", "librosa", "audioread", "pooch", "platformdirs", "decorator",
          "pystoi")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                   "manylinux1_x86_64", "manylinux_2_5_x86_64", "any")
NOISE_SECONDS = 60.0  # longer noise recordings are cut: many short pieces of many kinds beat a few long ones
VALID_PAIRS = 24
RIRS = 100


def tracked_bytes() -> int:
    """Bytes of the files git tracks in the repository (what travels besides the pack)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    return sum((REPO_ROOT / f).stat().st_size for f in listed.decode().split("\0") if f and (REPO_ROOT / f).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def write_audio(path: Path, audio: np.ndarray, opus: bool) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    if opus:
        sf.write(path, audio, SAMPLE_RATE, format="OGG", subtype="OPUS")
    else:
        sf.write(path, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return path.stat().st_size


def round_robin(root: Path) -> list[Path]:
    """Relative audio files of `root`, interleaved over their groups (the first two folder levels), each group in
    a seeded shuffled order: any prefix of the list spreads over every group."""
    groups: dict[str, list[Path]] = {}
    for f in find_audio_files(root):
        groups.setdefault("/".join(f.parts[:2]) if len(f.parts) > 2 else f.parts[0], []).append(f)
    rng = np.random.default_rng(0)
    queues = [list(np.array(files, dtype=object)[rng.permutation(len(files))]) for _, files in sorted(groups.items())]
    order = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    return order


def encode_until(source: Path, target: Path, budget: int, opus: bool, max_seconds: float | None = None,
                 max_files: int | None = None) -> dict:
    """Encode files of `source` (round-robin over groups) into `target` until `budget` bytes are used (or
    `max_files` files written)."""
    used, seconds, files = 0, 0.0, 0
    for relative in round_robin(source)[:max_files]:
        audio = load_audio(source / relative, SAMPLE_RATE)[0]
        if max_seconds is not None:
            audio = audio[: int(max_seconds * SAMPLE_RATE)]
        out = target / relative.with_suffix(".ogg" if opus else ".flac")
        size = write_audio(out, audio, opus)
        if used + size > budget:
            out.unlink()
            break
        used, seconds, files = used + size, seconds + len(audio) / SAMPLE_RATE, files + 1
    return {"files": files, "seconds": round(seconds, 1), "bytes": used}


def copy_valid_pairs(valid_sets: Path, target: Path, count: int) -> dict:
    """`count` (degraded, clean) pairs of the noise condition of a test-set folder, spread over its files."""
    degraded_root, clean_root = valid_sets / "noise", valid_sets / "clean"
    if not degraded_root.is_dir() or not clean_root.is_dir():
        raise UserError(f"{valid_sets} has no noise/ and clean/ folders (make them with `prepare_data.py testsets`)")
    names = [f for f in find_audio_files(degraded_root) if (clean_root / f).is_file()]
    chosen = [names[i] for i in np.linspace(0, len(names) - 1, min(count, len(names))).round().astype(int)]
    used = 0
    for relative in dict.fromkeys(chosen):
        for root, kind in ((degraded_root, "degraded"), (clean_root, "clean")):
            used += write_audio((target / kind / relative).with_suffix(".flac"),
                                load_audio(root / relative, SAMPLE_RATE)[0], opus=False)
    return {"pairs": len(set(chosen)), "bytes": used}


def download_wheels(target: Path) -> dict:
    """This machine's versions of WHEELS, as Python 3.12 manylinux x86-64 wheels (pip download from PyPI)."""
    target.mkdir(parents=True, exist_ok=True)
    pinned = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(target)]
    for platform in WHEEL_PLATFORMS:
        command += ["--platform", platform]
    done = subprocess.run(command + pinned, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"pip download of the wheels failed: {done.stderr.strip().splitlines()[-1:]}")
    return {"packages": pinned, "bytes": folder_bytes(target)}


def build_pack(corpus: Path, valid_sets: Path, output: Path, limit_mib: float, speech_share: float,
               wheels: bool = True) -> dict:
    for folder, what in ((corpus / "train", "speech"), (corpus / "noise" / "train", "noise"),
                         (corpus / "rir" / "train", "room responses")):
        if not folder.is_dir():
            raise UserError(f"{folder} not found ({what}); build the corpus with `bash scripts/make_corpus.sh`")
    clear(output)
    output.mkdir(parents=True)
    tracked = tracked_bytes()
    report: dict = {"tracked_bytes": tracked, "limit_bytes": int(limit_mib * MIB)}
    if wheels:
        report["wheels"] = download_wheels(output / "wheels")
    # A fixed number of responses: enough variety, a few hundred kB.
    report["rir"] = encode_until(corpus / "rir" / "train", output / "rir", 10**12, opus=False, max_files=RIRS)
    report["valid"] = copy_valid_pairs(valid_sets, output / "valid", VALID_PAIRS)
    room = report["limit_bytes"] - tracked - folder_bytes(output) - 64 * 1024  # pack.json and slack
    if room <= 0:
        raise UserError(f"the tracked tree ({tracked / MIB:.1f} MiB) and the wheels leave no room under "
                        f"--limit_mib {limit_mib}")
    report["speech"] = encode_until(corpus / "train", output / "speech", int(room * speech_share), opus=True)
    report["noise"] = encode_until(corpus / "noise" / "train", output / "noise",
                                   room - report["speech"]["bytes"], opus=True, max_seconds=NOISE_SECONDS)
    return finish(output, report)


def examples_pack(output: Path, examples: Path = REPO_ROOT / "examples") -> dict:
    """A tiny pack from examples/ for the smoke run: its clean clips as speech, the noise of its noise condition
    (degraded minus the least-squares-scaled clean) as noise, its noise pairs for validation, four synthetic room
    responses; no wheels."""
    clean_root, noisy_root = examples / "clean", examples / "degraded" / "noise"
    clear(output)
    report: dict = {"tracked_bytes": tracked_bytes(), "source": str(examples)}
    pairs = 0
    for relative in find_audio_files(clean_root):
        clean = load_audio(clean_root / relative, SAMPLE_RATE)[0]
        write_audio(output / "speech" / "examples" / relative.with_suffix(".ogg"), clean, opus=True)
        if (noisy_root / relative).is_file():
            noisy = load_audio(noisy_root / relative, SAMPLE_RATE)[0][: len(clean)]
            reference = clean[: len(noisy)]
            scale = float(np.dot(noisy, reference) / max(np.dot(reference, reference), 1e-12))
            write_audio(output / "noise" / "examples" / relative.with_suffix(".ogg"), noisy - scale * reference,
                        opus=True)
            write_audio((output / "valid" / "degraded" / relative).with_suffix(".flac"), noisy, opus=False)
            write_audio((output / "valid" / "clean" / relative).with_suffix(".flac"), reference, opus=False)
            pairs += 1
    if pairs == 0:
        raise UserError(f"{examples} has no clean clip with a degraded/noise counterpart")
    # A few exponentially decaying noise bursts as room responses: simulating rooms would take longer than the
    # whole smoke run, and its training only has to run.
    rng = np.random.default_rng(0)
    for i, rt60 in enumerate((0.2, 0.4, 0.6, 0.9)):
        t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
        response = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60)
        response[0] = 1.0
        write_audio(output / "rir" / f"synthetic_{i}.flac", 0.9 * response / np.abs(response).max(), opus=False)
    report["valid"] = {"pairs": pairs}
    report["rir"] = {"files": 4}
    return finish(output, report)


def clear(output: Path) -> None:
    """Remove an earlier pack at `output`; any other folder there is refused, never deleted."""
    if not output.exists():
        return
    if not output.is_dir() or (any(output.iterdir()) and not (output / "pack.json").is_file()):
        raise UserError(f"{output} exists and is not a pack (no pack.json): choose another --output")
    shutil.rmtree(output)


def finish(output: Path, report: dict) -> dict:
    report["pack_bytes"] = folder_bytes(output)
    report["total_bytes"] = report["tracked_bytes"] + report["pack_bytes"]
    (output / "pack.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def describe(report: dict) -> str:
    lines = [f"tracked tree {report['tracked_bytes'] / MIB:.1f} MiB + pack {report['pack_bytes'] / MIB:.1f} MiB = "
             f"{report['total_bytes'] / MIB:.1f} MiB"]
    for key in ("wheels", "rir", "valid", "speech", "noise"):
        if key in report:
            part = report[key]
            extra = f", {part['seconds'] / 60:.1f} min" if "seconds" in part else ""
            count = part.get("files", part.get("pairs", len(part.get("packages", []))))
            size = f"{part['bytes'] / MIB:.2f} MiB" if "bytes" in part else ""
            lines.append(f"  {key:7s} {count:5d} items{extra} {size}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    p.add_argument("--valid_sets", type=Path, default=Path("data/valid_sets"),
                   help="a test-set folder of the valid speakers (prepare_data.py testsets); its noise pairs")
    p.add_argument("--output", type=Path, default=Path("pack"))
    p.add_argument("--limit_mib", type=float, default=60.0, help="tracked tree + pack stay under this")
    p.add_argument("--speech_share", type=float, default=0.7, help="share of the data budget for speech")
    p.add_argument("--no_wheels", action="store_true", help="leave the wheels out (a machine that has them)")
    p.add_argument("--from_examples", action="store_true", help="a tiny pack from examples/ (smoke runs)")
    args = p.parse_args(argv)
    if not 0 < args.speech_share < 1:
        p.error("--speech_share must be between 0 and 1")

    def run() -> int:
        report = examples_pack(args.output) if args.from_examples else build_pack(
            args.corpus, args.valid_sets, args.output, args.limit_mib, args.speech_share, not args.no_wheels)
        print(describe(report))
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
