"""Helpers shared by the data-preparation jobs: output names, per-file seeds, worker processes and their shared
context, atomic CSVs, stale-file removal, and degradation of files written to disk (test sets and examples)."""
from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from dataset import load_bank
from degradations import AudioBank, degrade
from utils import UserError, atomic_write, load_config

log = logging.getLogger("paragse.prepare")

SAMPLE_RATE = load_config()["sample_rate"]  # config.json, the one place it is set


def relative_wav(rel: Path) -> Path:
    """The output name of an input file: same relative path, .wav suffix (repeated suffixes dropped)."""
    name = rel.name
    while Path(name).suffix.lower() in (".wav", ".flac", ".ogg", ".opus", ".g722"):
        name = Path(name).stem
    return rel.with_name(name + ".wav")


def stable_hash(text: str) -> int:
    """A process-independent hash (Python's hash() is salted per process) for seeding per-file generators."""
    return zlib.crc32(text.encode("utf-8"))


def worker_count(config: dict, requested: int | None) -> int:
    return max(1, requested or config["data"]["num_workers"] or os.cpu_count() or 1)


def run_parallel(function: Callable, jobs: Sequence, workers: int, initializer: Callable | None = None,
                 initargs: tuple = ()) -> list:
    """function(job) for every job on `workers` processes (in-process for one worker), results in job order."""
    if workers <= 1 or len(jobs) <= 1:
        if initializer:
            initializer(*initargs)
        return [function(job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(workers, initializer, initargs) as pool:
        return pool.map(function, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers))))


# Worker processes read their banks and settings from here (see set_context).
CONTEXT: dict[str, Any] = {}


def set_context(context: dict) -> None:
    """Pool initializer: the banks and settings every worker needs, sent once rather than with every job."""
    CONTEXT.clear()
    CONTEXT.update(context)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """CSV written atomically (temporary file, then rename)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, text.getvalue().encode())


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def remove_stale(root: Path, keep: set[Path], folders: Iterable[str]) -> int:
    """Delete .wav files under root/<folder> that this run did not produce (e.g. after a split change or a source
    left the config), and the folders that leaves empty (a speaker folder of nothing would still be listed)."""
    removed = 0
    for folder in folders:
        base = root / folder
        if not base.is_dir():
            continue
        for path in base.rglob("*.wav"):
            if path.resolve() not in keep:
                path.unlink()
                removed += 1
        for directory in sorted((d for d in base.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
            if not any(directory.iterdir()):
                directory.rmdir()
    return removed


def degradation_config(config: dict, overrides: dict) -> dict:
    """data.degradation with a section's overrides laid over it (override keys must exist there)."""
    base = dict(config["data"]["degradation"])
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise UserError(f"unknown data.degradation override key(s): {', '.join(unknown)}")
    return base | overrides


def load_rir_bank(rir_dir: str | Path) -> AudioBank:
    """RIRs of a folder; in a corpus (rir/<split>/ beside rir/manifest.csv) each keeps its simulation parameters."""
    rir_dir = Path(rir_dir)
    bank = load_bank(rir_dir, SAMPLE_RATE, "rir")
    manifest = rir_dir.parent / "manifest.csv"
    if manifest.is_file():
        params = {row["file"]: json.loads(row["parameters"]) for row in read_csv(manifest)}
        for i, name in enumerate(bank.names):
            corpus_name = f"{rir_dir.parent.name}/{rir_dir.name}/{name}"
            if corpus_name in params:
                bank.names[i] = corpus_name
                bank.params[i] = params[corpus_name]
    return bank


def degrade_for_disk(clean: np.ndarray, rng: np.random.Generator, cfg: dict, noise_bank: AudioBank | None,
                     rir_bank: AudioBank | None, condition: str) -> tuple[np.ndarray, dict]:
    """One condition for a file on disk: only the degraded signal is scaled if it would clip, since one clean
    reference file serves every condition; the gain is recorded."""
    degraded, params = degrade(clean, rng, cfg, noise_bank, rir_bank, condition, sample_rate=SAMPLE_RATE)
    peak = float(np.max(np.abs(degraded), initial=0.0))
    if peak > cfg["max_peak"]:
        degraded = degraded * (cfg["max_peak"] / peak)
        params["gain"] = round(cfg["max_peak"] / peak, 5)
    return degraded.astype(np.float32), params
