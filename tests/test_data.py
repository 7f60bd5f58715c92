"""Distortions, datasets and examples/ (issue #4). Tiny synthetic audio or examples/ only; no data/corpus needed."""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import dataset as data
import degradations
from utils import load_config, save_audio

SR = 16000
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def tone_speech(seconds: float, seed: int) -> np.ndarray:
    """A speech-like test signal: harmonics with a syllable-rate envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 30))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    return (0.1 * voiced * envelope + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


def band_energy_db(x: np.ndarray, cutoff_hz: float) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / SR)
    return 10 * math.log10(spectrum[freqs > cutoff_hz].sum() / spectrum.sum())


@pytest.fixture(scope="module")
def degradation() -> dict:
    return load_config()["data"]["degradation"]


@pytest.fixture(scope="module")
def banks(degradation: dict) -> tuple[degradations.AudioBank, degradations.AudioBank]:
    noise = degradations.AudioBank([np.random.default_rng(1).standard_normal(SR // 3).astype(np.float32)], ["white"])
    rir = degradations.simulate_rir_bank(2, seed=5, config=degradation, sample_rate=SR)
    return noise, rir


# ---------------------------------------------------------------------------------------------- distortions
@pytest.mark.parametrize("snr", [-5.0, 0.0, 2.5, 10.0, 20.0])
def test_add_noise_hits_the_snr(snr: float) -> None:
    clean = tone_speech(1.5, 0)
    noise = np.random.default_rng(3).standard_normal(7000).astype(np.float32)  # shorter: must loop
    noisy = degradations.add_noise(clean, noise, snr, np.random.default_rng(4))
    residual = noisy.astype(np.float64) - clean
    measured = 10 * math.log10(degradations.signal_power(clean) / degradations.signal_power(residual))
    assert noisy.shape == clean.shape
    assert abs(measured - snr) < 0.1


def test_add_noise_refuses_silent_noise() -> None:
    with pytest.raises(ValueError, match="silent"):
        degradations.add_noise(tone_speech(0.5, 0), np.zeros(100, np.float32), 5.0, np.random.default_rng(0))


def test_add_noise_avoids_silent_stretches_of_sparse_noise() -> None:
    """A +-1 square-wave burst, then 3.5 s of faint dither: the noise added must contain the burst, never the
    dither alone scaled up to the SNR (whose samples would not all share one magnitude)."""
    rng = np.random.default_rng(0)
    noise = 1e-6 * rng.standard_normal(SR * 4).astype(np.float32)
    noise[:SR // 2] = np.sign(np.sin(np.arange(SR // 2) * 0.3)) + (np.sin(np.arange(SR // 2) * 0.3) == 0)
    clean = tone_speech(0.25, 1)
    for seed in range(8):
        noisy = degradations.add_noise(clean, noise, 0.0, np.random.default_rng(seed))
        added = np.abs(noisy.astype(np.float64) - clean)
        loud = added[added > 1e-3 * added.max()]
        assert np.allclose(loud, added.max(), rtol=1e-3)


def test_reverberation_keeps_power_and_length(banks) -> None:
    clean = tone_speech(2.0, 1)
    _, rir_bank = banks
    for rir in rir_bank.signals:
        wet = degradations.reverberate(clean, rir)
        assert wet.shape == clean.shape
        assert abs(degradations.signal_power(wet) / degradations.signal_power(clean) - 1) < 0.01
        assert not np.allclose(wet, clean)


def test_simulated_rir_is_reproducible_and_aligned(degradation: dict) -> None:
    a, params_a = degradations.simulate_rir(np.random.default_rng(11), degradation, SR)
    b, params_b = degradations.simulate_rir(np.random.default_rng(11), degradation, SR)
    assert np.array_equal(a, b) and params_a == params_b
    assert np.argmax(np.abs(a)) == 0  # direct path first: reverberant speech stays aligned with the clean target
    assert degradation["rt60"][0] <= params_a["rt60"] <= degradation["rt60"][1]


@pytest.mark.parametrize("rate", [4000, 8000])
def test_band_limit_removes_the_top_band(rate: int) -> None:
    clean = np.random.default_rng(2).standard_normal(SR * 2).astype(np.float32)  # flat spectrum: worst case
    limited = degradations.band_limit(clean, rate, SR)
    assert limited.shape == clean.shape
    assert band_energy_db(limited, rate / 2) < -40
    assert band_energy_db(clean, rate / 2) > -10


def test_clip_at_quantiles() -> None:
    clean = tone_speech(1.0, 2)
    clipped = degradations.clip(clean, 0.1)
    low, high = np.quantile(clean, [0.1, 0.9])
    assert clipped.min() == pytest.approx(low) and clipped.max() == pytest.approx(high)
    assert np.mean(clipped == clipped.max()) >= 0.09 and np.mean(clipped == clipped.min()) >= 0.09


def test_degrade_is_deterministic_and_covers_every_condition(degradation: dict, banks) -> None:
    clean = tone_speech(1.0, 3)
    noise, rir = banks
    seen = set()
    for i in range(40):
        a, desc_a = degradations.degrade(clean, np.random.default_rng([9, i]), degradation, noise, rir, sample_rate=SR)
        b, desc_b = degradations.degrade(clean, np.random.default_rng([9, i]), degradation, noise, rir, sample_rate=SR)
        assert np.array_equal(a, b) and desc_a == desc_b
        assert a.shape == clean.shape and a.dtype == np.float32
        seen.add(desc_a["condition"])
    assert seen == set(degradations.CONDITIONS)
    mixture, desc = degradations.degrade(clean, np.random.default_rng(0), degradation, noise, rir, condition="mixture",
                                         sample_rate=SR)
    assert {"rir", "rt60", "snr_db", "noise"} <= set(desc)
    assert degradation["mixture_snr_db"][0] <= desc["snr_db"] <= degradation["mixture_snr_db"][1]


def test_probabilities_must_sum_to_one(degradation: dict) -> None:
    bad = dict(degradation, p_noise=degradation["p_noise"] + 0.5)
    with pytest.raises(data.UserError, match="sum to 1"):
        degradations.check_degradation_config(bad)


# ------------------------------------------------------------------------------------------------- datasets
@pytest.fixture()
def clean_dir(tmp_path: Path) -> Path:
    root = tmp_path / "clean"
    for i, seconds in enumerate([1.2, 0.3, 2.0]):
        save_audio(root / f"spk{i}" / f"utt{i}.wav", tone_speech(seconds, 10 + i), SR)
    return root


def test_clean_segments_are_deterministic_and_padded(clean_dir: Path) -> None:
    ds = data.CleanSegmentDataset(clean_dir, 8000, seed=3, sample_rate=SR)
    again = data.CleanSegmentDataset(clean_dir, 8000, seed=3, cache=False, sample_rate=SR)
    assert len(ds) == int(3.5 * SR) // 8000
    for i in range(len(ds)):
        item = ds[i]
        assert item.shape == (8000,) and item.dtype == torch.float32
        assert torch.allclose(item, again[i], atol=1 / 32767)  # int16 cache vs direct read
    first = [ds[i] for i in range(len(ds))]
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i]) for i, a in enumerate(first))
    whole = data.CleanSegmentDataset(clean_dir, None, seed=3, sample_rate=SR)
    assert len(whole) == 3 and whole[1].shape == (int(0.3 * SR),)
    short = data.CleanSegmentDataset([clean_dir / "spk1" / "utt1.wav"], 8000, seed=0, sample_rate=SR)
    assert short[0].shape == (8000,) and torch.all(short[0][int(0.3 * SR):] == 0)


def test_dataloader_workers_give_the_same_items(clean_dir: Path) -> None:
    ds = data.CleanSegmentDataset(clean_dir, 4000, seed=5, sample_rate=SR)
    direct = torch.stack([ds[i] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), num_workers=2)
    assert torch.equal(next(iter(loader)), direct)


def test_degraded_dataset_is_deterministic(clean_dir: Path, tmp_path: Path) -> None:
    noise_dir = tmp_path / "noise"
    save_audio(noise_dir / "hum.wav", 0.1 * np.sin(np.arange(SR) * 0.05).astype(np.float32), SR)
    save_audio(noise_dir / "hiss.wav", 0.05 * np.random.default_rng(0).standard_normal(SR).astype(np.float32), SR)
    config = load_config()["data"]
    config = dict(config, degradation=dict(config["degradation"], rir_bank_size=2))
    a = data.DegradedDataset(clean_dir, noise_dir, None, config, 8000, seed=4, sample_rate=SR)
    b = data.DegradedDataset(clean_dir, noise_dir, None, config, 8000, seed=4, sample_rate=SR)
    for i in range(len(a)):
        (da, ca), (db, cb) = a[i], b[i]
        assert da.shape == ca.shape == (8000,)
        assert torch.equal(da, db) and torch.equal(ca, cb)
        assert a.describe(i) == b.describe(i)
        assert max(da.abs().max(), ca.abs().max()) <= config["degradation"]["max_peak"] + 1e-6
    whole = data.DegradedDataset(clean_dir, noise_dir, None, config, None, seed=0, sample_rate=SR)
    assert whole[2][0].shape == whole[2][1].shape == (2 * SR,)


def test_speed_change_moves_pitch_and_keeps_pairs_full_length(clean_dir: Path, tmp_path: Path) -> None:
    t = np.arange(SR) / SR
    faster = degradations.change_speed(np.sin(2 * np.pi * 200 * t).astype(np.float32), 1.1, SR)
    assert abs(faster.size - SR / 1.1) <= 2
    spectrum = np.abs(np.fft.rfft(faster))
    assert abs(np.fft.rfftfreq(faster.size, 1 / SR)[spectrum.argmax()] - 220) < 2  # a smaller voice

    noise_dir = tmp_path / "noise"
    save_audio(noise_dir / "hiss.wav", 0.05 * np.random.default_rng(0).standard_normal(SR).astype(np.float32), SR)
    config = load_config()["data"]
    plain = dict(config, degradation=dict(config["degradation"], rir_bank_size=2))
    changed = dict(plain, degradation=dict(plain["degradation"], p_speed_change=1.0, speed_factor=[0.9, 1.1]))
    a = data.DegradedDataset(clean_dir, noise_dir, None, plain, 8000, seed=4, sample_rate=SR)
    b = data.DegradedDataset(clean_dir, noise_dir, None, changed, 8000, seed=4, sample_rate=SR)
    speeds = [b.describe(i)["speed"] for i in range(len(b))]
    assert all(0.9 <= s <= 1.1 for s in speeds) and "speed" not in a.describe(0)
    for i in range(len(b)):
        (da, ca), (db, cb) = a[i], b[i]
        assert db.shape == cb.shape == (8000,)
        assert a.describe(i)["condition"] == b.describe(i)["condition"]  # the speed draw has its own stream
        assert not torch.equal(ca, cb)
    with pytest.raises(data.UserError, match="speed_factor"):
        degradations.check_degradation_config(dict(changed["degradation"], speed_factor=[1.1, 0.9]))


@pytest.fixture()
def voicebank(tmp_path: Path) -> Path:
    """A fake VoiceBank+DEMAND tree: 3 good pairs, 1 length mismatch, 1 noisy-only, 1 clean-only."""
    root = tmp_path / "vb"
    noisy, clean = root / "noisy_trainset_28spk_wav", root / "clean_trainset_28spk_wav"
    for i, name in enumerate(("p226_001", "p226_002", "p287_010")):
        x = tone_speech(0.6, 20 + i)
        save_audio(clean / f"{name}.wav", x, SR)
        save_audio(noisy / f"{name}.wav", x + 0.01 * np.random.default_rng(1).standard_normal(x.size), SR)
    save_audio(clean / "p226_003.wav", tone_speech(0.6, 1), SR)
    save_audio(noisy / "p226_003.wav", tone_speech(0.5, 1), SR)
    save_audio(noisy / "p226_004.wav", tone_speech(0.5, 2), SR)
    save_audio(clean / "p999_001.wav", tone_speech(0.5, 3), SR)
    return root


def test_paired_dataset_matches_and_reports(voicebank: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="paragse.data"):
        ds = data.PairedDataset.voicebank(voicebank, "train", 4000, seed=1, sample_rate=SR)
    assert ds.names == ["p226_001.wav", "p226_002.wav", "p226_003.wav", "p287_010.wav"]
    assert ds.unmatched_degraded == ["p226_004.wav"] and ds.unmatched_clean == ["p999_001.wav"]
    assert ds.length_mismatched == ["p226_003.wav"]
    for name in ("p226_004.wav", "p999_001.wav", "p226_003.wav"):
        assert name in caplog.text
    noisy, clean = ds[0]
    assert noisy.shape == clean.shape == (4000,)
    assert torch.allclose(noisy, clean, atol=0.06)  # same offset for both
    assert torch.equal(ds[0][0], data.PairedDataset.voicebank(voicebank, "train", 4000, seed=1, sample_rate=SR)[0][0])
    whole = data.PairedDataset.voicebank(voicebank, "train", None, seed=0, sample_rate=SR)
    assert whole[2][0].shape == whole[2][1].shape == (int(0.5 * SR),)  # trimmed to the shorter


@pytest.mark.parametrize("cache", [False, True])
def test_paired_dataset_skips_a_corrupt_pair(voicebank: Path, cache: bool, caplog: pytest.LogCaptureFixture) -> None:
    bad = voicebank / "clean_trainset_28spk_wav" / "p226_002.wav"
    bad.write_bytes(b"RIFF junk that is no wav file")
    with caplog.at_level(logging.WARNING, logger="paragse.data"):
        ds = data.PairedDataset.voicebank(voicebank, "train", 4000, seed=1, cache=cache, sample_rate=SR)
    assert str(bad) in caplog.text
    assert ds.skipped == ["p226_002.wav"] and "p226_002.wav" not in ds.names and len(ds) == 3
    noisy, clean = ds[1]
    assert torch.allclose(noisy, clean, atol=0.06)  # still aligned pairs


def test_corrupt_file_is_skipped_with_a_warning(clean_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = clean_dir / "spk9" / "broken.wav"
    bad.parent.mkdir()
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    for cache in (True, False):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="paragse.data"):
            ds = data.CleanSegmentDataset(clean_dir, 4000, seed=0, cache=cache, sample_rate=SR)
        assert str(bad) in caplog.text and "skipping" in caplog.text
        assert ds.skipped == [str(bad)] and len(ds.files) == 3
        assert ds[0].shape == (4000,)


def test_file_that_breaks_after_construction_is_skipped(clean_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = data.CleanSegmentDataset(clean_dir, None, seed=0, cache=False, sample_rate=SR)
    victim = ds.files[0]
    victim.write_bytes(b"garbage")  # e.g. overwritten while a training run is going on
    with caplog.at_level(logging.WARNING, logger="paragse.data"):
        item = ds[0]
    assert str(victim) in caplog.text
    assert item.shape == (len(sf.read(ds.files[1])[0]),)  # the next file stands in


# ------------------------------------------------------------------------------------------------- examples
def test_examples_are_present_complete_and_small() -> None:
    manifest = EXAMPLES / "manifest.csv"
    assert manifest.is_file(), "run `python prepare_data.py examples`"
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == {"file", "condition", "parameters"}
    conditions = {row["condition"] for row in rows}
    assert conditions == {"clean", *degradations.CONDITIONS}
    for row in rows:
        path = EXAMPLES / row["file"]
        assert path.is_file(), path
        info = sf.info(str(path))
        assert info.samplerate == SR and info.channels == 1 and info.subtype == "PCM_16"
        assert 3.0 <= info.duration <= 6.0
        json.loads(row["parameters"])
        if row["condition"] != "clean":
            assert Path(row["file"]).parts[:2] == ("degraded", row["condition"])
    clean_names = {Path(r["file"]).name for r in rows if r["condition"] == "clean"}
    for condition in degradations.CONDITIONS:
        assert {Path(r["file"]).name for r in rows if r["condition"] == condition} == clean_names
    assert (EXAMPLES / "NOTICE").is_file() and "CC-BY-SA-3.0" in (EXAMPLES / "NOTICE").read_text()
    total = sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file())
    assert total < 3_000_000


# --------------------------------------------------------------------------------- corpus: speech_sources
def _write_tone(path: Path, seconds: float, rate: int, channels: int = 1, seed: int = 0, **kwargs) -> None:
    """tone_speech resampled by index to `rate` (its pitch does not matter here), in `channels` channels."""
    x = tone_speech(seconds * rate / SR, seed)[: int(seconds * rate)]
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, rate, **kwargs)


@pytest.fixture()
def speech_source(tmp_path: Path) -> tuple[dict, Path]:
    """A tiny package tree: language folders (one reader each), a stereo ogg, an 8 kHz file and a 96 kHz one to
    skip, a byte copy, an 8-bit file, a band-limited file, a file excluded by glob, one too short to keep, one outside
    every folder."""
    root = tmp_path / "pkg"
    _write_tone(root / "de" / "alpha" / "a.wav", 1.0, 44100, seed=1)
    _write_tone(root / "de" / "alpha" / "short.wav", 0.2, 44100, seed=2)
    _write_tone(root / "de" / "noise_x.wav", 1.0, 44100, seed=3)  # excluded by glob
    dull = tone_speech(1.0, 10)
    spectrum = np.fft.rfft(dull)
    spectrum[np.fft.rfftfreq(dull.size, 1 / SR) > 3000] = 0
    sf.write(root / "de" / "dull.wav", np.fft.irfft(spectrum, dull.size).astype(np.float32), SR)  # band-limited
    _write_tone(root / "fr" / "b.ogg", 1.0, 22050, channels=2, seed=4)  # stereo Vorbis
    _write_tone(root / "fr" / "phone.wav", 1.0, 8000, seed=5)  # telephone band: skipped
    _write_tone(root / "fr" / "fast.wav", 1.0, 96000, seed=6)  # above the maximum rate: skipped
    _write_tone(root / "fr" / "eight_bit.wav", 1.0, 22050, seed=7, subtype="PCM_U8")  # skipped
    _write_tone(root / "sr" / "c.wav", 1.0, 16000, seed=8)
    (root / "sr@latin").mkdir()
    (root / "sr@latin" / "c.wav").write_bytes((root / "sr" / "c.wav").read_bytes())  # a copy: skipped
    _write_tone(root / "top.wav", 1.0, 44100, seed=9)  # in no language folder: no speaker
    (root / "de" / "notes.txt").write_text("not audio")
    cfg = {"speech_min_sample_rate": 16000, "speech_max_sample_rate": 48000,
           "speech_skip_subtypes": ["PCM_U8", "PCM_S8"], "speech_high_band_hz": 4000,
           "speech_min_high_band_share": 0.001, "min_seconds": 0.5, "silence_rms_db": -60.0,
           "valid_speakers": ["fixture/fr"], "test_speakers": ["tuxpaint/sr"],
           "speech_sources": [{"name": "fixture", "package": "fixture-data", "dir": str(root),
                               "include": ["*.wav", "*.ogg"], "exclude": ["*/noise_*"], "speaker_level": 0}]}
    return cfg, root


def test_speech_sources_assign_speakers_filter_rates_and_split(speech_source: tuple[dict, Path]) -> None:
    from data_prep.corpus import speech_jobs, speech_source_files

    cfg, root = speech_source
    items, skipped = speech_source_files(cfg)
    got = {path.relative_to(root).as_posix(): (source, speaker, rel.as_posix()) for path, source, speaker, rel in items}
    assert got == {"de/alpha/a.wav": ("fixture", "de", "alpha/a.wav"),
                   "de/alpha/short.wav": ("fixture", "de", "alpha/short.wav"),
                   "fr/b.ogg": ("fixture", "fr", "b.wav"),
                   "sr/c.wav": ("fixture", "sr", "c.wav")}
    reasons = {Path(s.src).relative_to(root).as_posix(): s.reason for s in skipped}
    assert reasons == {"fr/phone.wav": "sample rate 8000 Hz < 16000 Hz",
                       "fr/fast.wav": "sample rate 96000 Hz > 48000 Hz (not a recording rate)",
                       "fr/eight_bit.wav": "PCM_U8 samples", "sr@latin/c.wav": "duplicate",
                       "de/dull.wav": "less than 0.1 % of its energy above 4000 Hz (band-limited: 0.000 %)",
                       "top.wav": "no speaker (the speaker rule does not match the path)"}
    splits = {j.dst: j.split for j in speech_jobs(items, cfg)}
    # valid by its pattern; 'sr' is a test speaker of tuxpaint only, so this source's sr reader trains
    assert splits == {"train/fixture/de/alpha/a.wav": "train", "train/fixture/de/alpha/short.wav": "train",
                      "valid/fixture/fr/b.wav": "valid", "train/fixture/sr/c.wav": "train"}


def test_speech_sources_decode_to_16k_mono_keep_existing_files_and_leave_cleanly(speech_source: tuple[dict, Path],
                                                                   tmp_path: Path) -> None:
    from data_prep.common import run_parallel, set_context
    from data_prep.corpus import _corpus_job, speech_jobs, speech_source_files

    cfg, _ = speech_source
    jobs = speech_jobs(speech_source_files(cfg)[0], cfg)
    out = tmp_path / "corpus"
    context = {"output_dir": out, "min_seconds": cfg["min_seconds"], "silence_rms_db": cfg["silence_rms_db"]}
    results = run_parallel(_corpus_job, jobs, 1, set_context, (context,))
    assert {r.job.dst: r.dropped for r in results} == {
        "train/fixture/de/alpha/a.wav": None, "train/fixture/de/alpha/short.wav": "short",
        "valid/fixture/fr/b.wav": None, "train/fixture/sr/c.wav": None}
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.wav"))
    assert written == ["train/fixture/de/alpha/a.wav", "train/fixture/sr/c.wav", "valid/fixture/fr/b.wav"]
    for rel in written:
        info = sf.info(str(out / rel))
        assert info.samplerate == SR and info.channels == 1 and abs(info.duration - 1.0) < 0.01
    # a second run (another source added) keeps what is there: the same inode, untouched, and the same length
    before = {rel: ((out / rel).stat().st_ino, (out / rel).stat().st_mtime_ns) for rel in written}
    again = run_parallel(_corpus_job, jobs, 1, set_context, (context,))
    assert {rel: ((out / rel).stat().st_ino, (out / rel).stat().st_mtime_ns) for rel in written} == before
    assert [(r.dropped, round(r.seconds, 2)) for r in again] == [(r.dropped, round(r.seconds, 2)) for r in results]
    # the source leaves the config: a rerun that keeps only another file removes the rest and the folders it empties
    from data_prep.common import remove_stale
    assert remove_stale(out, {(out / "train/fixture/sr/c.wav").resolve()}, ("train", "valid")) == 2
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "train", "train/fixture", "train/fixture/sr", "train/fixture/sr/c.wav", "valid"]


def test_speech_sources_refuse_a_missing_package_a_bad_rule_and_speech_as_noise(
        speech_source: tuple[dict, Path]) -> None:
    from data_prep.corpus import Job, check_speech_not_noise, speech_source_files
    from utils import UserError

    cfg, root = speech_source
    entry = cfg["speech_sources"][0]
    with pytest.raises(UserError, match=r"speech source fixture \(fixture-data\) not found at .*make_corpus"):
        speech_source_files(dict(cfg, speech_sources=[dict(entry, dir=str(root / "absent"))]))
    with pytest.raises(UserError, match="exactly one of speaker, speaker_level, speaker_regex"):
        speech_source_files(dict(cfg, speech_sources=[dict(entry, speaker="x")]))
    regex = dict(entry, speaker_level=None, speaker_regex=r"^(fr|sr)/", speaker_names={"fr": "french"})
    del regex["speaker_level"]
    items, _ = speech_source_files(dict(cfg, speech_sources=[regex]))
    assert sorted({speaker for _, _, speaker, _ in items}) == ["french", "sr"]
    src = str(root / "de" / "alpha" / "a.wav")
    with pytest.raises(UserError, match="is speech \\(fixture\\) and noise \\(game\\)"):
        check_speech_not_noise([Job("speech", src, "train/x.wav", "train", "fixture", "de"),
                                Job("noise", src, "noise/train/x.wav", "train", "game", "a")])


def test_configured_speech_sources_are_well_formed() -> None:
    """configs/corpus_more_speakers.json's entries (checked without the packages): one speaker rule each, rates
    16-48 kHz, and the megaglest voices are what config.json's megaglest noise entry excludes."""
    import fnmatch

    assert load_config()["data"]["corpus"]["speech_sources"] == []  # the corpus the shipped models were trained on
    corpus = load_config(REPO / "configs" / "corpus_more_speakers.json")["data"]["corpus"]
    assert corpus["speech_min_sample_rate"] == 16000
    names = [e["name"] for e in corpus["speech_sources"]]
    assert len(set(names)) == len(names) and {"klettres", "ktuberling", "gcin", "megaglest"} <= set(names)
    for entry in corpus["speech_sources"]:
        assert sum(key in entry for key in ("speaker", "speaker_level", "speaker_regex")) == 1, entry["name"]
    voices = next(e for e in corpus["speech_sources"] if e["name"] == "megaglest")
    noise = next(e for e in corpus["noise_sources"] if e["name"] == "megaglest")
    prefix = Path(voices["dir"]).relative_to(noise["dir"]).as_posix()
    for name in ("factions/indian/units/archer/sounds/archer_select1.wav", "commondata/sounds/guard_ack3.wav"):
        assert any(fnmatch.fnmatchcase(name, p) for p in voices["include"])
        assert any(fnmatch.fnmatchcase(f"{prefix}/{name}", p) for p in noise["exclude"])
