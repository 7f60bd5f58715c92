"""Data preparation: VoiceBank+DEMAND at 16 kHz, the paper's fixed test sets, the offline corpus, examples/.

    python prepare_data.py voicebank --input_dir VB48K --output_dir VB16K
    python prepare_data.py testsets --clean_dir VB16K/clean_testset_wav [--noisy_dir VB16K/noisy_testset_wav] \
        --output_dir data/testsets [--noise_dir data/corpus/noise/test] [--rir_dir DIR] [--seed N]
    python prepare_data.py corpus --output_dir data/corpus          (scripts/make_corpus.sh installs the sources)
    python prepare_data.py examples --corpus_dir data/corpus --output_dir examples

Every range, probability and source path comes from the "data" section of config.json (--config overlays a
partial JSON). All outputs are 16 kHz mono PCM-16 wav, written atomically; a fixed seed gives identical files.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import soundfile as sf

import dataset as data
from utils import AudioError, UserError, find_audio_files, load_audio, load_config, save_audio

log = logging.getLogger("paragse.prepare")

VOICEBANK_FOLDERS = ("clean_trainset_28spk_wav", "noisy_trainset_28spk_wav", "clean_testset_wav", "noisy_testset_wav")
SPLITS = ("train", "valid", "test")
NOISE_SPLITS = ("train", "test")
FILLETS_MAIN_CHARACTERS = ("m", "v")  # the small and the big fish: one actor each per language, in every level
DEBIAN_PACKAGES = {"asterisk": "asterisk-core-sounds-en-g722", "tuxpaint": "tuxpaint-stamps-default",
                   "lincity": "lincity-ng-data", "sonic-pi": "sonic-pi-samples"}
SAMPLE_RATE = 16000


# ============================================================================================== shared helpers
def relative_wav(rel: Path) -> Path:
    """The output name of an input file: same relative path, .wav suffix (repeated suffixes dropped)."""
    name = rel.name
    while Path(name).suffix.lower() in (".wav", ".flac", ".ogg", ".g722"):
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


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """CSV written atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def wav_bytes(num_samples: int) -> int:
    """Size of a mono PCM-16 wav as soundfile writes it (44-byte header)."""
    return 44 + 2 * num_samples


def remove_stale(root: Path, keep: set[Path], folders: Iterable[str]) -> int:
    """Delete .wav files under root/<folder> that this run did not produce (e.g. after a split change)."""
    removed = 0
    for folder in folders:
        base = root / folder
        if not base.is_dir():
            continue
        for path in base.rglob("*.wav"):
            if path.resolve() not in keep:
                path.unlink()
                removed += 1
    return removed


def degradation_config(config: dict, overrides: dict) -> dict:
    """data.degradation with a section's overrides laid over it (override keys must exist there)."""
    base = dict(config["data"]["degradation"])
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise UserError(f"unknown data.degradation override key(s): {', '.join(unknown)}")
    return base | overrides


def load_rir_bank(rir_dir: str | Path) -> data.AudioBank:
    """RIRs of a folder; in a corpus (rir/<split>/ beside rir/manifest.csv) each keeps its simulation parameters."""
    rir_dir = Path(rir_dir)
    bank = data.load_bank(rir_dir, SAMPLE_RATE, "rir")
    manifest = rir_dir.parent / "manifest.csv"
    if manifest.is_file():
        params = {row["file"]: json.loads(row["parameters"]) for row in read_csv(manifest)}
        for i, name in enumerate(bank.names):
            corpus_name = f"{rir_dir.parent.name}/{rir_dir.name}/{name}"
            if corpus_name in params:
                bank.names[i] = corpus_name
                bank.params[i] = params[corpus_name]
    return bank


def degrade_for_disk(clean: np.ndarray, rng: np.random.Generator, cfg: dict, noise_bank: data.AudioBank | None,
                     rir_bank: data.AudioBank | None, condition: str) -> tuple[np.ndarray, dict]:
    """One condition for a file on disk: only the degraded signal is scaled if it would clip, since one clean
    reference file serves every condition; the gain is recorded."""
    degraded, params = data.degrade(clean, rng, cfg, noise_bank, rir_bank, condition, SAMPLE_RATE)
    peak = float(np.max(np.abs(degraded), initial=0.0))
    if peak > cfg["max_peak"]:
        degraded = degraded * (cfg["max_peak"] / peak)
        params["gain"] = round(cfg["max_peak"] / peak, 5)
    return degraded.astype(np.float32), params


# ================================================================================================= voicebank
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


# ================================================================================================== testsets
_CONTEXT: dict[str, Any] = {}


def _set_context(context: dict) -> None:
    """Pool initializer: the banks and settings every worker needs, sent once rather than with every job."""
    _CONTEXT.clear()
    _CONTEXT.update(context)


def _testset_job(rel_text: str) -> list[tuple[str, str, str]]:
    ctx = _CONTEXT
    rel = Path(rel_text)
    out_rel = relative_wav(rel)
    clean = load_audio(ctx["clean_dir"] / rel, SAMPLE_RATE)[0]
    save_audio(ctx["output_dir"] / "clean" / out_rel, clean, SAMPLE_RATE)
    rows = [(f"clean/{out_rel.as_posix()}", "clean", "{}")]
    for k, condition in enumerate(data.CONDITIONS):
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
                else data.simulate_rir_bank(section["rir_count"], seed, cfg, SAMPLE_RATE))
    context = {"clean_dir": clean_dir, "noisy_dir": noisy_dir, "output_dir": output_dir, "seed": seed, "cfg": cfg,
               "noise_bank": data.load_bank(args.noise_dir, SAMPLE_RATE, "noise"), "rir_bank": rir_bank}
    results = run_parallel(_safe_testset_job, [f.as_posix() for f in files], worker_count(config, args.num_workers),
                           _set_context, (context,))
    rows = []
    for result in results:
        if isinstance(result, str):
            log.warning("skipped %s", result)
        else:
            rows.extend(result)
    write_csv(output_dir / "manifest.csv", ("file", "condition", "parameters"), rows)
    print(f"testsets: {len(rows) // (len(data.CONDITIONS) + 1)} clean files x {len(data.CONDITIONS)} conditions "
          f"({', '.join(data.CONDITIONS)}) -> {output_dir} (seed {seed})")


# ==================================================================================================== corpus
@dataclass
class Job:
    """One file to decode into the corpus: kind is 'speech' or 'noise'."""

    kind: str
    src: str
    dst: str  # relative to the corpus root
    split: str
    source: str
    group: str  # speaker (speech) or noise group


@dataclass
class Result:
    job: Job
    seconds: float
    dropped: str | None  # None, 'short', 'silent' or 'unreadable'
    detail: str = ""


def decode_g722(path: Path) -> np.ndarray:
    """Asterisk's raw G.722 prompts through ffmpeg (libsndfile cannot read them) -> 16 kHz float32."""
    if shutil.which("ffmpeg") is None:
        raise UserError("ffmpeg is not installed (scripts/make_corpus.sh installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "decoded.wav"
        proc = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "g722", "-i", str(path), "-ac", "1",
                               "-ar", str(SAMPLE_RATE), str(wav)], capture_output=True, text=True)
        if proc.returncode != 0 or not wav.exists():
            reason = (proc.stderr.strip().splitlines() or ["ffmpeg failed"])[-1]
            raise AudioError(f"cannot decode G.722 ({reason})")
        return load_audio(wav, SAMPLE_RATE)[0]


def _corpus_job(job: Job) -> Result:
    ctx = _CONTEXT
    dst = ctx["output_dir"] / job.dst
    if dst.exists():
        info = sf.info(str(dst))
        return Result(job, info.frames / info.samplerate, None)
    try:
        src = Path(job.src)
        audio = decode_g722(src) if src.suffix == ".g722" else load_audio(src, SAMPLE_RATE)[0]
    except AudioError as e:
        return Result(job, 0.0, "unreadable", f"{job.src}: {e}")
    seconds = audio.size / SAMPLE_RATE
    if seconds < ctx["min_seconds"]:
        return Result(job, seconds, "short")
    if 10 * math.log10(data.signal_power(audio) + 1e-20) < ctx["silence_rms_db"]:
        return Result(job, seconds, "silent")
    peak = float(np.max(np.abs(audio)))
    if peak > 1.0:  # some decoders overshoot; scale rather than let the PCM-16 writer clip
        audio = audio / peak
    save_audio(dst, audio, SAMPLE_RATE)
    return Result(job, seconds, None)


def split_of(source: str, speaker: str, corpus_cfg: dict) -> str:
    """'test', 'valid' or 'train' for a speaker, from the configured glob patterns on 'source/speaker'."""
    key = f"{source}/{speaker}"
    in_test = any(fnmatch.fnmatchcase(key, p) for p in corpus_cfg["test_speakers"])
    in_valid = any(fnmatch.fnmatchcase(key, p) for p in corpus_cfg["valid_speakers"])
    if in_test and in_valid:
        raise UserError(f"data.corpus: speaker {key} matches both valid_speakers and test_speakers")
    return "test" if in_test else "valid" if in_valid else "train"


def _require_dir(path: str, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{what} not found at {folder} (run scripts/make_corpus.sh to install the Debian packages)")
    return folder


def asterisk_speech(root: Path) -> list[tuple[Path, str, str, Path]]:
    """(file, source, speaker, output relative path): every Allison prompt, one speaker."""
    files = sorted(p for p in root.rglob("*.g722") if p.is_file())
    return [(p, "asterisk", "en_US_f_Allison", relative_wav(p.relative_to(root))) for p in files]


def _tuxpaint_stem(path: Path) -> str:
    name = path.name
    while name.lower().endswith(".ogg"):
        name = name[:-4]
    return name


_LANG = r"([a-z]{2,3}(?:_[A-Za-z]{2})?)"


def tuxpaint_languages(files: Sequence[Path]) -> dict[Path, str | None]:
    """The language of each tuxpaint sound, or None for sound effects.

    Readers are not named in the package, so the language stands for the speaker. Descriptions are
    '<stamp>_desc[_<lang>].ogg' (no code: English). Other spoken files are '<stamp>_<lang>.ogg' (numbers,
    letters); a suffix is taken as a language if descriptions use it, if it has the xx_YY locale form, or if
    the same stamp has it in several languages ('apple_red' is a sound effect, '7_de'/'7_el' are speech).
    """
    stems = {p: _tuxpaint_stem(p) for p in files}
    desc_languages = {m.group(1) for s in stems.values() if (m := re.search(r"_desc_" + _LANG + "$", s))}
    variants: dict[tuple[Path, str], set[str]] = defaultdict(set)
    for p, s in stems.items():
        if "_desc" not in s and (m := re.search(r"_" + _LANG + "$", s)):
            variants[(p.parent, s[:m.start()])].add(m.group(1))
    languages: dict[Path, str | None] = {}
    for p, s in stems.items():
        if s.endswith("_desc"):
            languages[p] = "en"
        elif m := re.search(r"_desc_" + _LANG + "$", s):
            languages[p] = m.group(1)
        elif m := re.search(r"_" + _LANG + "$", s):
            code = m.group(1)
            is_language = (code in desc_languages or re.fullmatch(r"[a-z]{2}_[A-Z]{2}", code) is not None
                           or len(variants[(p.parent, s[:m.start()])]) > 1)
            languages[p] = code if is_language else None
        else:
            languages[p] = None
    return languages


def tuxpaint_sounds(root: Path, exclude: Sequence[str]) -> tuple[list[tuple[Path, str, str, Path]], list[Path]]:
    """(speech items, sound-effect files). Unlabelled spoken numbers/letters (language unknown) are left out, and
    so are effects matching `exclude` (relative-path globs: voices such as spoken dreidel letters or laughs)."""
    files = sorted(p for p in root.rglob("*.ogg") if p.is_file())
    speech, effects = [], []
    for path, language in tuxpaint_languages(files).items():
        rel = path.relative_to(root)
        if language is not None:
            speech.append((path, "tuxpaint", language, relative_wav(rel)))
        elif rel.parts[:2] not in (("symbols", "alphabets"), ("symbols", "math")) and not any(
                fnmatch.fnmatchcase(rel.as_posix(), pattern) for pattern in exclude):
            effects.append(path)
    return speech, effects


def fillets_speaker(path: Path) -> str:
    """'<lang>_m' / '<lang>_v' for the two fish (one actor each), '<lang>_other' for everyone else.

    File names are '<level>-<character>-<line>.ogg' (or '<character>-<line>', '<line>-<character>'); minor
    characters change from level to level and cannot be told apart, so they form one group per language.
    """
    tokens = path.stem.split("-")
    if len(tokens) >= 3:
        character = tokens[1]
    elif len(tokens) == 2:
        character = tokens[1] if tokens[1] in FILLETS_MAIN_CHARACTERS else tokens[0]
    else:
        character = ""
    language = path.parent.name
    return f"{language}_{character}" if character in FILLETS_MAIN_CHARACTERS else f"{language}_other"


def fillets_speech(root: Path) -> list[tuple[Path, str, str, Path]]:
    files = sorted(p for p in root.rglob("*.ogg") if p.is_file() and re.fullmatch(r"[a-z]{2}", p.parent.name))
    return [(p, "fillets", fillets_speaker(p), Path(p.parent.parent.relative_to(root)) / relative_wav(Path(p.name)))
            for p in files]


def noise_group(path: Path) -> str:
    """Variants of one recording ('TraficHigh1', 'TraficHigh2') form a group kept within one split."""
    return re.sub(r"[_\-]?\d+$", "", path.stem) or path.stem


def noise_sources(corpus_cfg: dict, tuxpaint_effects: list[Path]) -> dict[str, list[Path]]:
    lincity = _require_dir(corpus_cfg["lincity_dir"], "lincity-ng-data sounds")
    sonic_pi = _require_dir(corpus_cfg["sonic_pi_dir"], "sonic-pi-samples")
    return {"lincity": sorted(p for p in lincity.rglob("*") if p.suffix.lower() in (".wav", ".ogg", ".flac")),
            "sonic-pi": sorted(p for p in sonic_pi.iterdir()
                               if any(fnmatch.fnmatchcase(p.name, pat) for pat in corpus_cfg["sonic_pi_noise"])),
            "tuxpaint": tuxpaint_effects}


def split_noise_groups(files: list[Path], fraction: float, seed: int, source: str) -> dict[Path, str]:
    """A seeded `fraction` of each source's recording groups (at least one) to test, the rest to train."""
    groups = sorted({noise_group(p) for p in files})
    order = np.random.default_rng([seed, stable_hash(source)]).permutation(len(groups))
    test_count = max(1, round(fraction * len(groups))) if len(groups) > 1 else 0
    test = {groups[i] for i in order[:test_count]}
    return {p: "test" if noise_group(p) in test else "train" for p in files}


def colored_noise(color: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """White / pink (1/f power) / brown (1/f^2 power) Gaussian noise at -20 dBFS RMS."""
    exponents = {"white": 0.0, "pink": 0.5, "brown": 1.0}
    if color not in exponents:
        raise UserError(f"data.corpus.colored_noise: unknown colour {color!r} (use {', '.join(exponents)})")
    n = int(seconds * SAMPLE_RATE)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spectrum /= np.maximum(freqs, 20.0) ** exponents[color]  # 20 Hz floor: no infinite DC
    noise = np.fft.irfft(spectrum, n)
    return (noise * 0.1 / np.sqrt(np.mean(noise ** 2))).astype(np.float32)


def _rir_job(job: tuple[str, int, int]) -> tuple[str, str, dict]:
    split, index, seed = job
    rir, params = data.simulate_rir(np.random.default_rng([seed, SPLITS.index(split), index]),
                                    _CONTEXT["degradation"], SAMPLE_RATE)
    rel = f"rir/{split}/rir_{index:04d}.wav"
    save_audio(_CONTEXT["output_dir"] / rel, rir * 0.99, SAMPLE_RATE)
    return rel, split, params


def corpus_jobs(corpus_cfg: dict) -> list[Job]:
    asterisk = _require_dir(corpus_cfg["asterisk_dir"], "asterisk-core-sounds-en-g722 (en_US_f_Allison)")
    tuxpaint = _require_dir(corpus_cfg["tuxpaint_dir"], "tuxpaint-stamps-default")
    fillets = _require_dir(corpus_cfg["fillets_dir"], "fillets-ng-data-cs / -nl")
    tux_speech, tux_effects = tuxpaint_sounds(tuxpaint, corpus_cfg["tuxpaint_noise_exclude"])
    jobs = []
    for path, source, speaker, rel in asterisk_speech(asterisk) + tux_speech + fillets_speech(fillets):
        split = split_of(source, speaker, corpus_cfg)
        jobs.append(Job("speech", str(path), f"{split}/{source}/{speaker}/{rel.as_posix()}", split, source, speaker))
    for source, files in noise_sources(corpus_cfg, tux_effects).items():
        splits = split_noise_groups(files, corpus_cfg["noise_test_fraction"], corpus_cfg["seed"], source)
        for path in files:
            rel = path.relative_to(corpus_cfg[f"{source.replace('-', '_')}_dir"])
            name = "_".join(relative_wav(rel).parts)
            jobs.append(Job("noise", str(path), f"noise/{splits[path]}/{source}/{name}", splits[path], source,
                            noise_group(path)))
    return jobs


def write_colored_noise(output_dir: Path, corpus_cfg: dict) -> list[list[Any]]:
    rows = []
    for s, split in enumerate(NOISE_SPLITS):
        for c, color in enumerate(corpus_cfg["colored_noise"]):
            rel = f"noise/{split}/colored/{color}.wav"
            if not (output_dir / rel).exists():
                rng = np.random.default_rng([corpus_cfg["seed"], 7, s, c])
                save_audio(output_dir / rel, colored_noise(color, corpus_cfg["colored_noise_seconds"], rng))
            rows.append([rel, split, "colored", color, corpus_cfg["colored_noise_seconds"], "generated (numpy)"])
    return rows


def check_disjoint(records: list[Result]) -> None:
    """Refuse a corpus in which a speaker (or a noise group) appears in two splits."""
    seen: dict[tuple[str, str, str], str] = {}
    for r in records:
        key = (r.job.kind, r.job.source, r.job.group)
        if seen.setdefault(key, r.job.split) != r.job.split:
            raise UserError(f"corpus: {r.job.kind} {r.job.source}/{r.job.group} is in both {seen[key]} "
                            f"and {r.job.split}")


def corpus_summary(kept: list[Result], rir_rows: list, colored_rows: list, dropped: dict[str, int],
                   seconds: float, output_dir: Path) -> str:
    lines = [f"corpus written to {output_dir} in {seconds:.0f} s"]
    for split in SPLITS:
        rs = [r for r in kept if r.job.kind == "speech" and r.job.split == split]
        sources = sorted({r.job.source for r in rs})
        speakers = {(r.job.source, r.job.group) for r in rs}
        per_source = ", ".join(f"{s} {sum(r.seconds for r in rs if r.job.source == s) / 60:.1f} min"
                               f" / {len({g for (src, g) in speakers if src == s})} spk" for s in sources)
        lines.append(f"  speech {split:5s}: {sum(r.seconds for r in rs) / 60:6.1f} min, {len(rs):5d} files, "
                     f"{len(speakers):2d} speakers/groups, {len(sources)} sources ({per_source})")
    for split in NOISE_SPLITS:
        rs = [r for r in kept if r.job.kind == "noise" and r.job.split == split]
        extra = [row for row in colored_rows if row[1] == split]
        minutes = (sum(r.seconds for r in rs) + sum(row[4] for row in extra)) / 60
        lines.append(f"  noise  {split:5s}: {minutes:6.1f} min, {len(rs) + len(extra)} files "
                     f"({len({(r.job.source, r.job.group) for r in rs})} recording groups + {len(extra)} coloured)")
    lines.append(f"  rirs: {sum(1 for r in rir_rows if r[1] == 'train')} train, "
                 f"{sum(1 for r in rir_rows if r[1] == 'test')} test (pyroomacoustics)")
    lines.append(f"  dropped: {dropped.get('short', 0)} shorter than the minimum, {dropped.get('silent', 0)} silent, "
                 f"{dropped.get('unreadable', 0)} unreadable")
    return "\n".join(lines)


def cmd_corpus(args: argparse.Namespace, config: dict) -> None:
    """Decode the Debian packages' speech and noise into data/corpus, split by speaker, plus simulated RIRs."""
    started = time.time()
    corpus_cfg, output_dir = config["data"]["corpus"], Path(args.output_dir)
    jobs = corpus_jobs(corpus_cfg)
    workers = worker_count(config, args.num_workers)
    context = {"output_dir": output_dir, "min_seconds": corpus_cfg["min_seconds"],
               "silence_rms_db": corpus_cfg["silence_rms_db"], "degradation": config["data"]["degradation"]}
    print(f"corpus: decoding {len(jobs)} files on {workers} processes ...", flush=True)
    results = run_parallel(_corpus_job, jobs, workers, _set_context, (context,))
    kept = [r for r in results if r.dropped is None]
    dropped: dict[str, int] = defaultdict(int)
    for r in results:
        if r.dropped:
            dropped[r.dropped] += 1
            if r.dropped == "unreadable":
                log.warning("skipped %s", r.detail)
    check_disjoint(kept)
    colored_rows = write_colored_noise(output_dir, corpus_cfg)
    rir_jobs = [(split, i, corpus_cfg["seed"]) for split in NOISE_SPLITS for i in range(corpus_cfg[f"rir_{split}"])]
    print(f"corpus: simulating {len(rir_jobs)} room impulse responses ...", flush=True)
    rir_rows = [[rel, split, json.dumps(params, sort_keys=True)]
                for rel, split, params in run_parallel(_rir_job, rir_jobs, workers, _set_context, (context,))]
    keep = {(output_dir / r.job.dst).resolve() for r in kept}
    keep |= {(output_dir / row[0]).resolve() for row in colored_rows + rir_rows}
    stale = remove_stale(output_dir, keep, SPLITS + ("noise", "rir"))
    if stale:
        print(f"corpus: removed {stale} files of an earlier run that are no longer part of the corpus")
    speech = sorted((r for r in kept if r.job.kind == "speech"), key=lambda r: r.job.dst)
    write_csv(output_dir / "manifest.csv", ("file", "split", "source", "speaker", "seconds"),
              ([r.job.dst, r.job.split, r.job.source, r.job.group, f"{r.seconds:.3f}"] for r in speech))
    noise = sorted((r for r in kept if r.job.kind == "noise"), key=lambda r: r.job.dst)
    write_csv(output_dir / "noise" / "manifest.csv", ("file", "split", "source", "group", "seconds", "original"),
              [[r.job.dst, r.job.split, r.job.source, r.job.group, f"{r.seconds:.3f}", r.job.src] for r in noise]
              + colored_rows)
    write_csv(output_dir / "rir" / "manifest.csv", ("file", "split", "parameters"), rir_rows)
    print(corpus_summary(kept, rir_rows, colored_rows, dropped, time.time() - started, output_dir))


# ================================================================================================== examples
def trim_silence(audio: np.ndarray, below_peak_db: float, margin_seconds: float) -> np.ndarray:
    """Drop leading/trailing samples quieter than `below_peak_db` re the peak (10 ms frames), keeping a margin."""
    frame = SAMPLE_RATE // 100
    frames = audio[: audio.size // frame * frame].reshape(-1, frame)
    level = np.sqrt(np.mean(frames ** 2, axis=1)) + 1e-12
    active = np.flatnonzero(20 * np.log10(level / level.max()) > below_peak_db)
    if active.size == 0:
        return audio
    margin = int(margin_seconds * SAMPLE_RATE)
    return audio[max(0, active[0] * frame - margin): min(audio.size, (active[-1] + 1) * frame + margin)]


def debian_copyright(package: str, installed: Path) -> tuple[str, str]:
    """(Copyright, License) of an installed file from its package's machine-readable copyright file.

    Paragraphs are matched on the file name and its folder's name (installed paths differ from the source tree's);
    the last matching paragraph wins, as in the DEP-5 format.
    """
    text_path = Path("/usr/share/doc") / package / "copyright"
    if not text_path.is_file():
        raise UserError(f"{text_path} not found: is {package} installed? (scripts/make_corpus.sh)")
    found = ("", "")
    for paragraph in re.split(r"\n\s*\n", text_path.read_text(errors="replace")):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*((?:.*)(?:\n[ \t]+.*)*)", paragraph, flags=re.M))
        if "Files" not in fields:
            continue
        for pattern in fields["Files"].split():
            parts = pattern.split("/")
            if fnmatch.fnmatchcase(installed.name, parts[-1]) and (
                    len(parts) == 1 or fnmatch.fnmatchcase(installed.parent.name, parts[-2])):
                holder = " ".join(fields.get("Copyright", "").split())
                found = (holder, fields.get("License", "").splitlines()[0].strip() if "License" in fields else "")
    return found


def _example_clean_clips(corpus_dir: Path, ex_cfg: dict) -> list[tuple[str, np.ndarray]]:
    """The held-out Allison prompts that, trimmed of silence, last between min_seconds and max_seconds."""
    rows = [r for r in read_csv(corpus_dir / "manifest.csv") if r["split"] == "test" and r["source"] == "asterisk"]
    if not rows:
        raise UserError(f"{corpus_dir}/manifest.csv has no asterisk (Allison) test speech: run scripts/make_corpus.sh")
    clips = []
    for row in sorted(rows, key=lambda r: r["file"]):
        if not ex_cfg["min_seconds"] - 0.5 <= float(row["seconds"]) <= ex_cfg["max_seconds"] + 2.0:
            continue  # cheap pre-filter on the untrimmed length
        audio = trim_silence(load_audio(corpus_dir / row["file"], SAMPLE_RATE)[0],
                             ex_cfg["trim_below_peak_db"], ex_cfg["trim_margin_seconds"])
        if ex_cfg["min_seconds"] <= audio.size / SAMPLE_RATE <= ex_cfg["max_seconds"]:
            clips.append(("allison_" + Path(row["file"]).stem.replace("-", "_"), audio))
    if len(clips) < ex_cfg["num_clips"]:
        raise UserError(f"only {len(clips)} Allison test prompts last {ex_cfg['min_seconds']}-{ex_cfg['max_seconds']} s"
                        f" after trimming; data.examples asks for {ex_cfg['num_clips']}")
    rng = np.random.default_rng(ex_cfg["seed"])
    chosen = sorted(rng.choice(len(clips), ex_cfg["num_clips"], replace=False).tolist())
    return [clips[i] for i in chosen]


def _example_noise_bank(corpus_dir: Path) -> tuple[data.AudioBank, dict[str, tuple[str, str, str]]]:
    """Test noise whose licence lets it be mixed into CC-BY-SA speech (CC0, MIT or generated): GPL-2 sound
    effects are left out of the committed examples, as GPL-2 and CC-BY-SA-3.0 are not compatible."""
    bank, credits = data.AudioBank([], [], []), {}
    for row in read_csv(corpus_dir / "noise" / "manifest.csv"):
        if row["split"] != "test":
            continue
        if row["source"] == "colored":
            holder, licence = "", "synthetic"
        elif row["source"] in DEBIAN_PACKAGES:
            holder, licence = debian_copyright(DEBIAN_PACKAGES[row["source"]], Path(row["original"]))
            if licence not in ("CC0", "MIT"):
                continue
        else:
            continue
        bank.signals.append(load_audio(corpus_dir / row["file"], SAMPLE_RATE)[0])
        bank.names.append(row["file"])
        bank.params.append({})
        credits[row["file"]] = (row["original"], holder, licence)
    if not bank.signals:
        raise UserError(f"{corpus_dir}/noise/test has no CC0/MIT/generated noise for the examples")
    return bank, credits


def notice_text(used_noise: dict[str, tuple[str, str, str]]) -> str:
    holder, licence = debian_copyright(DEBIAN_PACKAGES["asterisk"], Path("en_US_f_Allison/x.g722"))
    lines = [
        "Audio examples of ParaGSE (made by `python prepare_data.py examples`; see manifest.csv for every parameter).",
        "",
        "Speech (clean/, and degraded in degraded/<condition>/):",
        "  Asterisk core sound prompts, US English voice en_US_f_Allison",
        "  (Debian package asterisk-core-sounds-en-g722).",
        "  Recorded by Allison Smith (http://www.theivrvoice.com); financial contributions by Digium, Inc.",
        "  (http://www.digium.com).",
        f"  Copyright: {holder}",
        f"  License: {licence} (https://creativecommons.org/licenses/by-sa/3.0/)",
        "  Changes: decoded from G.722, leading/trailing silence trimmed, degraded as described in manifest.csv.",
        f"  These clips and their degraded versions are distributed under the same licence, {licence}.",
        "",
        "Noise mixed into degraded/noise/ and degraded/mixture/ (only noise free to combine with CC-BY-SA speech):",
    ]
    for name, (original, noise_holder, noise_licence) in sorted(used_noise.items()):
        if noise_licence == "synthetic":
            lines.append(f"  {name}: {Path(name).stem} noise synthesised with numpy by prepare_data.py (no copyright)")
        else:
            lines.append(f"  {name}: from {original}; Copyright: {noise_holder}; License: {noise_licence}")
    lines += ["",
              "Room impulse responses (degraded/reverb/, degraded/mixture/): simulated with pyroomacoustics,",
              "no recording.",
              ""]
    return "\n".join(lines)


def cmd_examples(args: argparse.Namespace, config: dict) -> None:
    """Short held-out clean clips and one degraded version per condition, small enough to commit."""
    ex_cfg, corpus_dir, output_dir = config["data"]["examples"], Path(args.corpus_dir), Path(args.output_dir)
    clips = _example_clean_clips(corpus_dir, ex_cfg)
    total = sum(wav_bytes(a.size) for _, a in clips) * (len(data.CONDITIONS) + 1)
    if total > ex_cfg["max_total_bytes"]:
        raise UserError(f"examples would take {total} bytes, over data.examples.max_total_bytes "
                        f"{ex_cfg['max_total_bytes']}: lower num_clips or max_seconds")
    cfg = degradation_config(config, config["data"]["testsets"]["degradation"] | {"snr_db": ex_cfg["snr_db"]})
    noise_bank, credits = _example_noise_bank(corpus_dir)
    rir_bank = load_rir_bank(corpus_dir / "rir" / "test")
    rows, written, used = [], set(), {}
    for name, clean in clips:
        path = output_dir / "clean" / f"{name}.wav"
        save_audio(path, clean, SAMPLE_RATE)
        rows.append([f"clean/{name}.wav", "clean", "{}"])
        written.add(path.resolve())
        for k, condition in enumerate(data.CONDITIONS):
            rng = np.random.default_rng([ex_cfg["seed"], stable_hash(name), k])
            degraded, params = degrade_for_disk(clean, rng, cfg, noise_bank, rir_bank, condition)
            path = output_dir / "degraded" / condition / f"{name}.wav"
            save_audio(path, degraded, SAMPLE_RATE)
            written.add(path.resolve())
            rows.append([f"degraded/{condition}/{name}.wav", condition, json.dumps(params, sort_keys=True)])
            if "noise" in params:
                used[params["noise"]] = credits[params["noise"]]
    remove_stale(output_dir, written, ("clean", "degraded"))
    write_csv(output_dir / "manifest.csv", ("file", "condition", "parameters"), rows)
    (output_dir / "NOTICE").write_text(notice_text(used))
    size = sum(p.stat().st_size for p in output_dir.rglob("*") if p.is_file())
    print(f"examples: {len(clips)} clips x {len(data.CONDITIONS)} conditions -> {output_dir} ({size / 1e6:.2f} MB)")


# ======================================================================================================= CLI
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="partial JSON config laid over config.json")
    common.add_argument("--num_workers", type=int, help="processes (default: data.num_workers)")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("voicebank", parents=[common],
                       help="resample a VoiceBank+DEMAND download to 16 kHz, same layout")
    p.add_argument("--input_dir", required=True)
    p.add_argument("--output_dir", required=True)
    p = sub.add_parser("testsets", parents=[common],
                       help="the fixed test sets (noise, reverb, bandlimit, clipping, mixture)")
    p.add_argument("--clean_dir", required=True, help="clean 16 kHz test speech")
    p.add_argument("--noisy_dir", help="official noisy counterparts (same relative paths) for the noise condition")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--noise_dir", default="data/corpus/noise/test", help="test noise (default: %(default)s)")
    p.add_argument("--rir_dir", help="room impulse responses (default: simulate data.testsets.rir_count)")
    p.add_argument("--seed", type=int, help="default: data.testsets.seed")
    p = sub.add_parser("corpus", parents=[common],
                       help="the offline training corpus from Debian packages (scripts/make_corpus.sh)")
    p.add_argument("--output_dir", default="data/corpus")
    p = sub.add_parser("examples", parents=[common], help="examples/: held-out clips and their degraded versions")
    p.add_argument("--corpus_dir", default="data/corpus")
    p.add_argument("--output_dir", default="examples")
    return parser


COMMANDS = {"voicebank": cmd_voicebank, "testsets": cmd_testsets, "corpus": cmd_corpus, "examples": cmd_examples}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        COMMANDS[args.command](args, load_config(args.config))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
