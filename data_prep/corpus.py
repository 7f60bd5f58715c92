"""`prepare_data.py corpus`: the offline training corpus (data/corpus) decoded from Debian packages.

Speech (Allison prompts, tuxpaint stamp descriptions, fillets-ng voice acting, and any `speech_sources` of the
config: configs/corpus_more_speakers.json names klettres letters, ktuberling words, gcin syllables and megaglest unit
voices) is split by speaker into
train/valid/test, noise (lincity-ng, sonic-pi, tuxpaint sound effects, generated coloured noise) by recording group
into train/test, and room impulse responses are simulated; each part gets a manifest.csv. The source packages are
installed by scripts/make_corpus.sh. Files that are already in the output folder are kept as they are, so a
source added to the config is decoded without redoing the rest.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import json
import math
import re
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile as sf

from data_prep.common import (CONTEXT, SAMPLE_RATE, log, relative_wav, remove_stale, run_parallel, set_context,
                              stable_hash, worker_count, write_csv)
from degradations import signal_power, simulate_rir
from utils import AudioError, UserError, load_audio, save_audio

SPLITS = ("train", "valid", "test")
NOISE_SPLITS = ("train", "test")
FILLETS_MAIN_CHARACTERS = ("m", "v")  # the small and the big fish: one actor each per language, in every level
SPEECH_SUFFIXES = (".wav", ".ogg", ".opus", ".flac")  # what `speech_sources` entries may point at (ktuberling: opus)
NOISE_SUFFIXES = (".wav", ".ogg", ".flac")  # what `noise_sources` entries may point at
SPEAKER_RULES = ("speaker", "speaker_level", "speaker_regex")


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
class Skipped:
    """A file of a `speech_sources` entry that is not decoded, and why (logged and counted in the summary)."""

    source: str
    src: str
    reason: str


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
    ctx = CONTEXT
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
    if 10 * math.log10(signal_power(audio) + 1e-20) < ctx["silence_rms_db"]:
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


def asterisk_transcripts(path: Path) -> dict[str, str]:
    """{prompt name ('dictate/pause'): what Allison says} from the prompt list of asterisk-core-sounds-en, without
    the entries that only describe a sound ('[this is a simple beep tone]')."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    transcripts = {}
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            name, sep, text = line.partition(":")
            text = re.sub(r"\[[^\]]*\]", "", text).strip()
            if sep and not name.startswith(";") and re.search(r"[A-Za-z0-9]", text):
                transcripts[name.strip()] = text
    return transcripts


def write_transcripts(output_dir: Path, kept: list["Result"], corpus_cfg: dict) -> int:
    """<split>_transcripts.csv (file relative to the split folder, text) for the Allison prompts of each split, for
    evaluate.py --metrics wer; returns how many files have one."""
    source = Path(corpus_cfg["asterisk_transcripts"])
    if not source.is_file():
        log.warning("no transcripts: %s is missing (scripts/make_corpus.sh installs asterisk-core-sounds-en)", source)
        return 0
    texts, count = asterisk_transcripts(source), 0
    for split in SPLITS:
        rows = []
        for r in kept:
            if r.job.kind == "speech" and r.job.split == split and r.job.source == "asterisk":
                prompt = Path(r.job.src).relative_to(corpus_cfg["asterisk_dir"]).with_suffix("").as_posix()
                if prompt in texts:
                    rows.append([Path(r.job.dst).relative_to(split).as_posix(), texts[prompt]])
        if rows:
            write_csv(output_dir / f"{split}_transcripts.csv", ("file", "text"), sorted(rows))
            count += len(rows)
    return count


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


def _ascii_path(rel: Path) -> Path:
    """Non-ASCII characters of an output name as 'uXXXX' (gcin's folders are Zhuyin syllables): corpus files are
    packed and copied to other machines and tools, where plain ASCII names are the safe kind."""
    return Path(*(re.sub(r"[^\x00-\x7f]", lambda m: f"u{ord(m.group()):04x}", part) for part in rel.parts))


def _check_speech_source(entry: dict) -> None:
    rules = [key for key in SPEAKER_RULES if key in entry]
    if len(rules) != 1:
        raise UserError(f"data.corpus.speech_sources: {entry.get('name', entry)} needs exactly one of "
                        f"{', '.join(SPEAKER_RULES)} (has {', '.join(rules) or 'none'})")


def source_speaker(entry: dict, rel: Path) -> tuple[str, Path] | None:
    """(speaker, output path under the speaker's folder) of a file of a `speech_sources` entry, by the entry's one
    speaker rule: `speaker` (a fixed name), `speaker_level` (the folder at that depth under `dir` names the speaker:
    a language folder, read by one person) or `speaker_regex` (its groups that matched, joined by '_', then renamed
    by the optional `speaker_names`). None when the rule finds no speaker for the file."""
    if "speaker" in entry:
        return entry["speaker"], rel
    if "speaker_level" in entry:
        level = entry["speaker_level"]
        if len(rel.parts) <= level + 1:  # a file beside the speaker folders, not in one
            return None
        return rel.parts[level], Path(*rel.parts[level + 1:])
    match = re.search(entry["speaker_regex"], rel.as_posix())
    if match is None or not any(match.groups()):
        return None
    raw = "_".join(group for group in match.groups() if group)
    return entry.get("speaker_names", {}).get(raw, raw), rel


def high_band_share(path: Path, cutoff_hz: float) -> float:
    """The share of a file's energy (channels mixed, DC removed) above cutoff_hz, at its native rate; 0 if silent."""
    audio, rate = sf.read(str(path), dtype="float64", always_2d=True)
    mono = audio.mean(axis=1)
    power = np.abs(np.fft.rfft(mono - mono.mean())) ** 2
    total = power.sum()
    return float(power[np.fft.rfftfreq(mono.size, 1 / rate) >= cutoff_hz].sum() / total) if total > 0 else 0.0


def speech_source_files(corpus_cfg: dict) -> tuple[list[tuple[Path, str, str, Path]], list[Skipped]]:
    """(speech items, skipped files) of every `speech_sources` entry of the config.

    An entry's files are those under its `dir` matching one of its `include` globs and none of its `exclude` globs
    (paths relative to `dir`) that its speaker rule gives a speaker. Of those, a file is skipped (with its reason)
    when its native format makes it a poor clean target or would count it twice:
    - a rate below speech_min_sample_rate is telephone band (ktuberling's 8/11 kHz words): nothing above 4-5.5 kHz
      to learn, and a band-limited target teaches the model that a band-limited signal is clean;
    - a rate above speech_max_sample_rate is no recording rate: the klettres files that claim 128 kHz hold nothing
      above ~4 kHz (narrowband audio stored at a made-up rate);
    - a subtype in speech_skip_subtypes (8-bit PCM) carries audible quantisation noise;
    - less than speech_min_high_band_share of its energy above speech_high_band_hz is a band-limited recording at a
      wide-band rate (most klettres and ktuberling words hold under 0.1 % above 4 kHz, the corpus's own speech about
      0.6 %): trained on such targets, the model learnt to leave band-limited input dull (docs/experiments.md,
      item 23);
    - bytes identical to a file already taken (ktuberling's sr@latin/sr@ijekavian* folders copy sr/, megaglest
      units share sounds) would weigh the same recording twice.
    """
    items: list[tuple[Path, str, str, Path]] = []
    skipped: list[Skipped] = []
    seen: dict[str, str] = {}  # content hash -> the file taken
    min_rate, max_rate = corpus_cfg["speech_min_sample_rate"], corpus_cfg["speech_max_sample_rate"]
    cutoff_hz, min_share = corpus_cfg["speech_high_band_hz"], corpus_cfg["speech_min_high_band_share"]
    for entry in corpus_cfg["speech_sources"]:
        _check_speech_source(entry)
        name = entry["name"]
        root = _require_dir(entry["dir"], f"speech source {name} ({entry['package']})")
        count = len(items)
        for path in entry_files(root, entry, SPEECH_SUFFIXES):
            rel = path.relative_to(root)
            found = source_speaker(entry, rel)
            if found is None:
                skipped.append(Skipped(name, str(path), "no speaker (the speaker rule does not match the path)"))
                continue
            speaker, below = found
            try:
                info = sf.info(str(path))
            except (sf.LibsndfileError, RuntimeError, OSError) as e:
                skipped.append(Skipped(name, str(path), f"unreadable ({str(e).splitlines()[-1] if str(e) else e})"))
                continue
            if info.samplerate < min_rate:
                skipped.append(Skipped(name, str(path), f"sample rate {info.samplerate} Hz < {min_rate} Hz"))
                continue
            if info.samplerate > max_rate:
                skipped.append(Skipped(name, str(path), f"sample rate {info.samplerate} Hz > {max_rate} Hz "
                                                         f"(not a recording rate)"))
                continue
            if info.subtype in corpus_cfg["speech_skip_subtypes"]:
                skipped.append(Skipped(name, str(path), f"{info.subtype} samples"))
                continue
            digest = hashlib.sha1(path.read_bytes()).hexdigest()
            if digest in seen:
                skipped.append(Skipped(name, str(path), "duplicate"))
                continue
            seen[digest] = str(path)
            if min_share > 0:
                share = high_band_share(path, cutoff_hz)
                if share < min_share:
                    # The measured share in parentheses: the summary counts reasons without them.
                    skipped.append(Skipped(name, str(path), f"less than {100 * min_share:g} % of its energy above "
                                                             f"{cutoff_hz} Hz (band-limited: {100 * share:.3f} %)"))
                    continue
            speaker = _ascii_path(Path(speaker)).as_posix()
            items.append((path, name, speaker, relative_wav(_ascii_path(below))))
        if len(items) == count:
            raise UserError(f"data.corpus.speech_sources: {name} keeps no audio file under {root}")
    return items, skipped


def check_speech_not_noise(jobs: list[Job]) -> None:
    """Refuse a file that is both speech and noise (megaglest's unit voices sit beside its ambience): the model
    would be taught to remove what it must keep."""
    speech = {Path(j.src).resolve(): j.source for j in jobs if j.kind == "speech"}
    for job in jobs:
        if job.kind == "noise" and Path(job.src).resolve() in speech:
            raise UserError(f"data.corpus: {job.src} is speech ({speech[Path(job.src).resolve()]}) and noise "
                            f"({job.source}): exclude it from one of them")


def speech_jobs(items: Sequence[tuple[Path, str, str, Path]], corpus_cfg: dict) -> list[Job]:
    """A job per speech item, into <split>/<source>/<speaker>/ by the speaker's split."""
    jobs = []
    for path, source, speaker, rel in items:
        split = split_of(source, speaker, corpus_cfg)
        jobs.append(Job("speech", str(path), f"{split}/{source}/{speaker}/{rel.as_posix()}", split, source, speaker))
    return jobs


def noise_group(path: Path) -> str:
    """Variants of one recording ('TraficHigh1', 'TraficHigh2') form a group kept within one split."""
    return re.sub(r"[_\-]?\d+$", "", path.stem) or path.stem


def entry_files(root: Path, entry: dict, suffixes: tuple[str, ...]) -> list[Path]:
    """The files of a `noise_sources` / `speech_sources` entry, sorted: those under `root` with one of `suffixes`
    whose path relative to `root` matches one of the entry's `include` globs and none of its `exclude` globs."""
    def matches(rel: str, patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(rel, pattern) for pattern in patterns)

    return [path for path in sorted(root.rglob("*"))
            if path.suffix.lower() in suffixes and path.is_file()
            and matches(rel := path.relative_to(root).as_posix(), entry["include"])
            and not matches(rel, entry.get("exclude", []))]


def noise_sources(corpus_cfg: dict, tuxpaint_effects: list[Path]) -> dict[str, tuple[Path, list[Path]]]:
    """{source: (root, files)}: the tuxpaint sound effects plus every `noise_sources` entry of the config, whose
    files are those under its `dir` matching one of its `include` globs (paths relative to `dir`) and none of its
    `exclude` globs (voice lines of game units, for instance: speech is not noise)."""
    sources = {"tuxpaint": (Path(corpus_cfg["tuxpaint_dir"]), tuxpaint_effects)}
    for entry in corpus_cfg["noise_sources"]:
        root = _require_dir(entry["dir"], f"noise source {entry['name']} ({entry['package']})")
        files = entry_files(root, entry, NOISE_SUFFIXES)
        if not files:
            raise UserError(f"data.corpus.noise_sources: {entry['name']} matches no audio file under {root}")
        sources[entry["name"]] = (root, files)
    return sources


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


def rir_file(split: str, index: int) -> str:
    return f"rir/{split}/rir_{index:04d}.wav"


def reusable_rirs(output_dir: Path) -> dict[str, dict]:
    """{file: simulation parameters} of the RIRs an earlier run wrote and listed in rir/manifest.csv. A RIR is a
    function of (seed, split, index), so those files are kept rather than simulated and rewritten again; delete
    rir/ after changing data.degradation's room settings."""
    manifest = output_dir / "rir" / "manifest.csv"
    if not manifest.is_file():
        return {}
    with open(manifest, newline="") as f:
        return {row["file"]: json.loads(row["parameters"]) for row in csv.DictReader(f)
                if (output_dir / row["file"]).is_file()}


def _rir_job(job: tuple[str, int, int]) -> tuple[str, str, dict]:
    split, index, seed = job
    rir, params = simulate_rir(np.random.default_rng([seed, SPLITS.index(split), index]),
                               CONTEXT["degradation"], SAMPLE_RATE)
    rel = rir_file(split, index)
    save_audio(CONTEXT["output_dir"] / rel, rir * 0.99, SAMPLE_RATE)
    return rel, split, params


def corpus_jobs(corpus_cfg: dict) -> tuple[list[Job], list[Skipped]]:
    asterisk = _require_dir(corpus_cfg["asterisk_dir"], "asterisk-core-sounds-en-g722 (en_US_f_Allison)")
    tuxpaint = _require_dir(corpus_cfg["tuxpaint_dir"], "tuxpaint-stamps-default")
    fillets = _require_dir(corpus_cfg["fillets_dir"], "fillets-ng-data-cs / -nl")
    tux_speech, tux_effects = tuxpaint_sounds(tuxpaint, corpus_cfg["tuxpaint_noise_exclude"])
    more_speech, skipped = speech_source_files(corpus_cfg)
    jobs = speech_jobs(asterisk_speech(asterisk) + tux_speech + fillets_speech(fillets) + more_speech, corpus_cfg)
    for source, (root, files) in noise_sources(corpus_cfg, tux_effects).items():
        splits = split_noise_groups(files, corpus_cfg["noise_test_fraction"], corpus_cfg["seed"], source)
        for path in files:
            rel = path.relative_to(root)
            name = "_".join(relative_wav(rel).parts)
            jobs.append(Job("noise", str(path), f"noise/{splits[path]}/{source}/{name}", splits[path], source,
                            noise_group(path)))
    check_speech_not_noise(jobs)
    return jobs, skipped


def write_colored_noise(output_dir: Path, corpus_cfg: dict) -> list[list[Any]]:
    rows = []
    for s, split in enumerate(NOISE_SPLITS):
        for c, color in enumerate(corpus_cfg["colored_noise"]):
            rel = f"noise/{split}/colored/{color}.wav"
            if not (output_dir / rel).exists():
                rng = np.random.default_rng([corpus_cfg["seed"], 7, s, c])
                noise = colored_noise(color, corpus_cfg["colored_noise_seconds"], rng)
                save_audio(output_dir / rel, noise, SAMPLE_RATE)
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


def speech_source_summary(corpus_cfg: dict, results: list[Result], skipped: list[Skipped]) -> list[str]:
    """A line per `speech_sources` entry: files kept (minutes, speakers per split), skipped and dropped, and why."""
    lines = []
    for entry in corpus_cfg["speech_sources"]:
        name = entry["name"]
        rs = [r for r in results if r.job.kind == "speech" and r.job.source == name]
        kept = [r for r in rs if r.dropped is None]
        per_split = ", ".join(
            f"{split} {sum(r.seconds for r in kept if r.job.split == split) / 60:.1f} min / "
            f"{len({r.job.group for r in kept if r.job.split == split})} spk"
            for split in SPLITS if any(r.job.split == split for r in kept))
        reasons: dict[str, int] = defaultdict(int)
        for s in skipped:
            if s.source == name:
                reasons[re.sub(r" \(.*", "", s.reason)] += 1
        for r in rs:
            if r.dropped:
                reasons[{"short": f"shorter than {corpus_cfg['min_seconds']} s"}.get(r.dropped, r.dropped)] += 1
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "none"
        lines.append(f"  speech source {name}: {len(kept)} files kept ({per_split or 'none'}); "
                     f"{sum(reasons.values())} not used: {why}")
    return lines


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
    jobs, skipped = corpus_jobs(corpus_cfg)
    for s in skipped:
        log.info("skipped %s: %s", s.src, s.reason)
    workers = worker_count(config, args.num_workers)
    context = {"output_dir": output_dir, "min_seconds": corpus_cfg["min_seconds"],
               "silence_rms_db": corpus_cfg["silence_rms_db"], "degradation": config["data"]["degradation"]}
    print(f"corpus: decoding {len(jobs)} files on {workers} processes (files already written are kept) ...",
          flush=True)
    results = run_parallel(_corpus_job, jobs, workers, set_context, (context,))
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
    earlier = reusable_rirs(output_dir)
    to_simulate = [job for job in rir_jobs if rir_file(job[0], job[1]) not in earlier]
    print(f"corpus: simulating {len(to_simulate)} room impulse responses ({len(rir_jobs) - len(to_simulate)} "
          f"kept) ...", flush=True)
    params = earlier | {rel: p for rel, _, p in run_parallel(_rir_job, to_simulate, workers, set_context, (context,))}
    rir_rows = [[rir_file(split, i), split, json.dumps(params[rir_file(split, i)], sort_keys=True)]
                for split, i, _ in rir_jobs]
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
    transcribed = write_transcripts(output_dir, speech, corpus_cfg)
    print(f"corpus: transcripts of {transcribed} files (evaluate.py --metrics wer --transcripts ...)")
    print(corpus_summary(kept, rir_rows, colored_rows, dropped, time.time() - started, output_dir))
    print("\n".join(speech_source_summary(corpus_cfg, results, skipped)))
