"""`prepare_data.py testsets`: the paper's fixed test sets, every clean file under every degradation condition.

Writes OUT/clean/<relative path>, OUT/<condition>/<relative path> and OUT/manifest.csv (file, condition, the
parameters drawn as JSON). The noise condition can take the official noisy counterparts (--noisy_dir) instead.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from data_prep.common import (CONTEXT, SAMPLE_RATE, degradation_config, degrade_for_disk, load_rir_bank, log,
                              relative_wav, run_parallel, set_context, stable_hash, worker_count, write_csv)
from dataset import load_bank
from degradations import CONDITIONS, simulate_rir_bank
from utils import AudioError, UserError, find_audio_files, load_audio, save_audio


def _testset_job(rel_text: str) -> list[tuple[str, str, str]]:
    ctx = CONTEXT
    rel = Path(rel_text)
    out_rel = relative_wav(rel)
    clean = load_audio(ctx["clean_dir"] / rel, SAMPLE_RATE)[0]
    save_audio(ctx["output_dir"] / "clean" / out_rel, clean, SAMPLE_RATE)
    rows = [(f"clean/{out_rel.as_posix()}", "clean", "{}")]
    for k, condition in enumerate(CONDITIONS):
        params = None
        if condition == "noise" and ctx["noisy_dir"] is not None:
            official = ctx["noisy_dir"] / rel
            if official.is_file():
                degraded = load_audio(official, SAMPLE_RATE)[0]
                params = {"condition": "noise", "source": "official noisy set", "file": rel.as_posix()}
            else:
                log.warning("%s: no counterpart in --noisy_dir %s; generating noise instead", rel, ctx["noisy_dir"])
        if params is None:
            rng = np.random.default_rng([ctx["seed"], stable_hash(rel.as_posix()), k])
            degraded, params = degrade_for_disk(clean, rng, ctx["cfg"], ctx["noise_bank"], ctx["rir_bank"], condition)
        save_audio(ctx["output_dir"] / condition / out_rel, degraded, SAMPLE_RATE)
        rows.append((f"{condition}/{out_rel.as_posix()}", condition, json.dumps(params, sort_keys=True)))
    return rows


def _safe_testset_job(rel_text: str) -> list[tuple[str, str, str]] | str:
    try:
        return _testset_job(rel_text)
    except AudioError as e:
        return f"{rel_text}: {e}"


def cmd_testsets(args: argparse.Namespace, config: dict) -> None:
    """The fixed test sets: OUT/clean, OUT/<condition>/<relative path>, OUT/manifest.csv."""
    section = config["data"]["testsets"]
    clean_dir, output_dir = Path(args.clean_dir), Path(args.output_dir)
    noisy_dir = Path(args.noisy_dir) if args.noisy_dir else None
    for flag, folder in (("--clean_dir", clean_dir), ("--noisy_dir", noisy_dir), ("--noise_dir", Path(args.noise_dir))):
        if folder is not None and not folder.is_dir():
            hint = " (build it with scripts/make_corpus.sh)" if flag == "--noise_dir" else ""
            raise UserError(f"{flag} not found: {folder}{hint}")
    files = find_audio_files(clean_dir)
    if not files:
        raise UserError(f"no .wav/.flac/.ogg files in --clean_dir {clean_dir}")
    seed = section["seed"] if args.seed is None else args.seed
    cfg = degradation_config(config, section["degradation"])
    rir_bank = (load_rir_bank(args.rir_dir) if args.rir_dir
                else simulate_rir_bank(section["rir_count"], seed, cfg, SAMPLE_RATE))
    context = {"clean_dir": clean_dir, "noisy_dir": noisy_dir, "output_dir": output_dir, "seed": seed, "cfg": cfg,
               "noise_bank": load_bank(args.noise_dir, SAMPLE_RATE, "noise"), "rir_bank": rir_bank}
    results = run_parallel(_safe_testset_job, [f.as_posix() for f in files], worker_count(config, args.num_workers),
                           set_context, (context,))
    rows = []
    for result in results:
        if isinstance(result, str):
            log.warning("skipped %s", result)
        else:
            rows.extend(result)
    write_csv(output_dir / "manifest.csv", ("file", "condition", "parameters"), rows)
    print(f"testsets: {len(rows) // (len(CONDITIONS) + 1)} clean files x {len(CONDITIONS)} conditions "
          f"({', '.join(CONDITIONS)}) -> {output_dir} (seed {seed})")
