"""`prepare_data.py examples`: examples/, short held-out clean clips and one degraded version per condition.

The clips are Allison prompts of the corpus's test split (CC-BY-SA-3.0); only noise whose licence allows mixing
into them is used, and examples/NOTICE credits every source. Small enough to commit (data.examples.max_total_bytes).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import re
from pathlib import Path

import numpy as np

from data_prep.common import (SAMPLE_RATE, degradation_config, degrade_for_disk, load_rir_bank, read_csv,
                              remove_stale, stable_hash, write_csv)
from degradations import CONDITIONS, AudioBank
from utils import UserError, load_audio, save_audio

DEBIAN_PACKAGES = {"asterisk": "asterisk-core-sounds-en-g722", "tuxpaint": "tuxpaint-stamps-default",
                   "lincity": "lincity-ng-data", "sonic-pi": "sonic-pi-samples"}


def wav_bytes(num_samples: int) -> int:
    """Size of a mono PCM-16 wav as soundfile writes it (44-byte header)."""
    return 44 + 2 * num_samples


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


def _example_clean_clips(corpus_dir: Path, ex_cfg: dict) -> list[tuple[str, np.ndarray, str]]:
    """(name, audio, corpus file relative to the test split) of the held-out Allison prompts that, trimmed of
    silence, last between min_seconds and max_seconds."""
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
            clips.append(("allison_" + Path(row["file"]).stem.replace("-", "_"), audio,
                          Path(row["file"]).relative_to("test").as_posix()))
    if len(clips) < ex_cfg["num_clips"]:
        raise UserError(f"only {len(clips)} Allison test prompts last {ex_cfg['min_seconds']}-{ex_cfg['max_seconds']} s"
                        f" after trimming; data.examples asks for {ex_cfg['num_clips']}")
    rng = np.random.default_rng(ex_cfg["seed"])
    chosen = sorted(rng.choice(len(clips), ex_cfg["num_clips"], replace=False).tolist())
    return [clips[i] for i in chosen]


def _example_noise_bank(corpus_dir: Path) -> tuple[AudioBank, dict[str, tuple[str, str, str]]]:
    """Test noise whose licence lets it be mixed into CC-BY-SA speech (CC0, MIT or generated): GPL-2 sound
    effects are left out of the committed examples, as GPL-2 and CC-BY-SA-3.0 are not compatible."""
    bank, credits = AudioBank([], [], []), {}
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
    total = sum(wav_bytes(a.size) for _, a, _ in clips) * (len(CONDITIONS) + 1)
    if total > ex_cfg["max_total_bytes"]:
        raise UserError(f"examples would take {total} bytes, over data.examples.max_total_bytes "
                        f"{ex_cfg['max_total_bytes']}: lower num_clips or max_seconds")
    cfg = degradation_config(config, config["data"]["testsets"]["degradation"] | {"snr_db": ex_cfg["snr_db"]})
    noise_bank, credits = _example_noise_bank(corpus_dir)
    rir_bank = load_rir_bank(corpus_dir / "rir" / "test")
    rows, written, used = [], set(), {}
    transcripts = {}
    if (corpus_dir / "test_transcripts.csv").is_file():
        transcripts = {r["file"]: r["text"] for r in read_csv(corpus_dir / "test_transcripts.csv")}
    write_csv(output_dir / "transcripts.csv", ("file", "text"),
              [[f"{name}.wav", transcripts[source]] for name, _, source in clips if source in transcripts])
    for name, clean, _ in clips:
        path = output_dir / "clean" / f"{name}.wav"
        save_audio(path, clean, SAMPLE_RATE)
        rows.append([f"clean/{name}.wav", "clean", "{}"])
        written.add(path.resolve())
        for k, condition in enumerate(CONDITIONS):
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
    print(f"examples: {len(clips)} clips x {len(CONDITIONS)} conditions -> {output_dir} ({size / 1e6:.2f} MB)")
