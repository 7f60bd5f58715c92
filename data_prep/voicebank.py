"""`prepare_data.py voicebank`: a VoiceBank+DEMAND download resampled to 16 kHz, in the same folder layout."""
from __future__ import annotations

import argparse
from pathlib import Path

from data_prep.common import SAMPLE_RATE, log, relative_wav, run_parallel, worker_count
from utils import AudioError, UserError, find_audio_files, load_audio, save_audio

VOICEBANK_FOLDERS = ("clean_trainset_28spk_wav", "noisy_trainset_28spk_wav", "clean_testset_wav", "noisy_testset_wav")


def _resample_job(job: tuple[str, str]) -> str | None:
    src, dst = job
    try:
        save_audio(dst, load_audio(src, SAMPLE_RATE)[0], SAMPLE_RATE)
    except AudioError as e:
        return f"{src}: {e}"
    return None


def cmd_voicebank(args: argparse.Namespace, config: dict) -> None:
    """Resample a VoiceBank+DEMAND download to 16 kHz in the same layout, skipping existing outputs."""
    source, target = Path(args.input_dir), Path(args.output_dir)
    if not source.is_dir():
        raise UserError(f"--input_dir not found: {source}")
    present = [f for f in VOICEBANK_FOLDERS if (source / f).is_dir()]
    if not present:
        raise UserError(f"{source} has none of the VoiceBank+DEMAND folders {', '.join(VOICEBANK_FOLDERS)}")
    for missing in sorted(set(VOICEBANK_FOLDERS) - set(present)):
        log.warning("%s: folder %s not found, not converted", source, missing)
    jobs, existing = [], 0
    for folder in present:
        for rel in find_audio_files(source / folder):
            dst = target / folder / relative_wav(rel)
            if dst.exists():
                existing += 1
            else:
                jobs.append((str(source / folder / rel), str(dst)))
    failures = [f for f in run_parallel(_resample_job, jobs, worker_count(config, args.num_workers)) if f]
    for failure in failures:
        log.warning("skipped %s", failure)
    print(f"voicebank: {len(jobs) - len(failures)} files written, {existing} already there, "
          f"{len(failures)} unreadable; folders: {', '.join(present)} -> {target}")
