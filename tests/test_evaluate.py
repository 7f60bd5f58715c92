"""Tests for evaluate.py: metric values on known pairs, pairing layouts, CLI output, exit codes, figures.

Audio is synthesised (harmonic voice-like source through three formant resonators, syllable and word
envelopes, fixed seeds) so the tests need no data files. Most runs use --no_dnsmos; one test runs DNSMOS.
"""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pesq
import pytest
import soundfile as sf
from scipy.signal import lfilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests run from anywhere, without an installed package

import evaluate  # noqa: E402
import metrics  # noqa: E402
from utils import save_audio  # noqa: E402

SR = 16000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def speech_like(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """A voiced, speech-like test signal: gliding f0 harmonics, formants at 0.6/1.4/2.6 kHz, ~4 syllables
    per second and smooth pauses between "words" (PESQ's voice-activity detection needs such structure)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 130 + 25 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) + 10 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    source = sum(np.sin(k * phase) / k for k in range(1, 60)) + 0.05 * rng.standard_normal(len(t))
    voice = np.zeros_like(t)
    for centre, bandwidth in ((600, 90), (1400, 120), (2600, 200)):
        r, theta = np.exp(-np.pi * bandwidth / SR), 2 * np.pi * centre / SR
        voice += lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], source)
    syllables = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None) ** 1.5
    words = 0.5 + 0.5 * np.tanh(8 * (np.sin(2 * np.pi * 0.6 * t) + 0.6))
    x = voice * syllables * words
    return (0.5 * x / np.max(np.abs(x))).astype(np.float32)


def add_noise(x: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(len(x))
    noise *= np.sqrt(np.mean(x.astype(np.float64) ** 2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return (x + noise).astype(np.float32)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """C/u0,u1,u2.wav (flat); D and E with one folder per condition (noisy5, noisy15); the enhanced
    noisy5/u2.wav is corrupt. Enhanced = clean + 0.3 x the degraded input's noise."""
    root = tmp_path_factory.mktemp("eval")
    for i in range(3):
        clean = speech_like(2.0, seed=i)
        save_audio(root / "C" / f"u{i}.wav", clean, 16000)
        for snr in (5, 15):
            noisy = add_noise(clean, snr, seed=10 * i + snr)
            save_audio(root / "D" / f"noisy{snr}" / f"u{i}.wav", noisy, 16000)
            save_audio(root / "E" / f"noisy{snr}" / f"u{i}.wav", clean + 0.3 * (noisy - clean), 16000)
    (root / "E" / "noisy5" / "u2.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    return {"root": root, "E": root / "E", "C": root / "C", "D": root / "D"}


# --------------------------------------------------------------------------------------------- metrics
def test_clean_against_itself_is_perfect(dataset):
    rows = evaluate.evaluate_dirs(dataset["C"], dataset["C"], workers=1, dnsmos=False, progress=False)
    assert len(rows) == 3 and not any(row["error"] for row in rows)
    for row in rows:
        assert row["condition"] == "all"
        assert row["pesq"] == pytest.approx(4.64, abs=0.01)
        assert row["estoi"] == pytest.approx(1.0, abs=1e-3)
        assert row["stoi"] == pytest.approx(1.0, abs=1e-3)
        assert row["si_sdr"] > 100
        assert row["lsd"] == pytest.approx(0.0, abs=1e-9)
    table = evaluate.summarise(rows)
    assert table.count("\n| all |") == 1  # a single "all" condition is not repeated as an overall row


def test_pesq_equals_direct_library_call(dataset, tmp_path):
    ref, _ = sf.read(dataset["C"] / "u0.wav", dtype="float32")
    deg, _ = sf.read(dataset["D"] / "noisy5" / "u0.wav", dtype="float32")
    expected = pesq.pesq(SR, ref, deg, "wb")
    assert metrics.score_pair(deg, ref, dnsmos=False)["pesq"] == expected
    # ... and through the CLI and its CSV (written at full precision).
    out = tmp_path / "r.csv"
    code = evaluate.main(["--enhanced_dir", str(dataset["D"]), "--clean_dir", str(dataset["C"]),
                          "--output", str(out), "--workers", "1", "--no_dnsmos"])
    assert code == 0
    row = next(r for r in read_rows(out) if r["file"] == "noisy5/u0.wav")
    assert float(row["pesq"]) == expected


def test_si_sdr_and_lsd_definitions():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(SR).astype(np.float32) * 0.1
    n = rng.standard_normal(SR).astype(np.float32) * 0.01
    # Scale invariance: rescaling the estimate does not change SI-SDR.
    assert metrics.si_sdr(3.0 * (x + n), x) == pytest.approx(metrics.si_sdr(x + n, x), abs=1e-6)
    assert metrics.si_sdr(x + n, x) == pytest.approx(20.0, abs=0.5)  # noise 20 dB below the signal
    # A gain of 2 is +6.02 dB in every bin, so the LSD is 6.02 dB (white noise: the floor never matters).
    assert metrics.log_spectral_distance(2.0 * x, x) == pytest.approx(20 * math.log10(2), abs=1e-3)


def test_length_mismatch_is_trimmed_and_reported():
    x = speech_like(2.0, seed=4)
    notes: list[str] = []
    longer = np.concatenate([x, np.zeros(SR // 10, np.float32)])  # 5% longer
    scores = metrics.score_pair(longer, x, dnsmos=False, notes=notes)
    assert scores["pesq"] > 4.5 and len(notes) == 1 and "lengths differ" in notes[0]
    notes.clear()
    metrics.score_pair(np.concatenate([x, np.zeros(8, np.float32)]), x, dnsmos=False, notes=notes)
    assert notes == []  # a few samples (< 1%) of framing difference is trimmed silently


@pytest.mark.parametrize(
    "clean, enhanced, reason",
    [
        (np.zeros(SR, np.float32), speech_like(1.0), "silent reference"),
        (speech_like(1.0)[:2000], speech_like(1.0)[:2000], "too short for PESQ"),
        (speech_like(1.0), np.zeros(SR, np.float32), "silent signal"),
    ],
)
def test_unscorable_pairs_raise_with_reason(clean, enhanced, reason):
    with pytest.raises(metrics.MetricError, match=reason):
        metrics.score_pair(enhanced, clean, dnsmos=False)


def test_dnsmos_scores_are_mos_values(tmp_path):
    """DNSMOS through the CLI on one short file, in-process (bundled ONNX models, no download)."""
    clean = speech_like(2.0, seed=7)
    save_audio(tmp_path / "C" / "a.wav", clean, 16000)
    save_audio(tmp_path / "E" / "a.wav", add_noise(clean, 20, seed=1), 16000)
    out = tmp_path / "r.csv"
    assert evaluate.main(["--enhanced_dir", str(tmp_path / "E"), "--clean_dir", str(tmp_path / "C"),
                          "--output", str(out), "--workers", "1"]) == 0
    (row,) = read_rows(out)
    for column in ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"):
        assert 1.0 <= float(row[column]) <= 5.0


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_end_to_end(dataset, tmp_path):
    """Real subprocess, two worker processes, condition folders against a flat clean folder."""
    out, figures = tmp_path / "results.csv", tmp_path / "figs"
    result = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), "--enhanced_dir", str(dataset["E"]),
         "--clean_dir", str(dataset["C"]), "--degraded_dir", str(dataset["D"]), "--output", str(out),
         "--workers", "2", "--no_dnsmos", "--figures", "1", "--figures_dir", str(figures)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    rows = read_rows(out)
    assert [r["file"] for r in rows] == [f"noisy{s}/u{i}.wav" for s in (15, 5) for i in range(3)]
    assert {r["condition"] for r in rows} == {"noisy5", "noisy15"}
    assert "degraded_pesq" in rows[0] and "dnsmos_sig" not in rows[0]

    bad = next(r for r in rows if r["file"] == "noisy5/u2.wav")
    assert bad["pesq"] == "" and "cannot decode audio" in bad["error"]
    assert "cannot score noisy5/u2.wav: enhanced file: cannot decode audio" in result.stdout
    assert "1 of 6 files could not be scored" in result.stdout

    table = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert set(table) == {"condition", "noisy15", "noisy5", "all"}
    # The corrupt file is out of the means: noisy5 has 2 files, and its PESQ mean is that of the good rows.
    cells = [c.strip() for c in table["noisy5"].split("|")[1:-1]]
    assert cells[1] == "2" and table["all"].split("|")[2].strip() == "5"
    good = [float(r["pesq"]) for r in rows if r["condition"] == "noisy5" and not r["error"]]
    degraded = [float(r["degraded_pesq"]) for r in rows if r["condition"] == "noisy5" and not r["error"]]
    assert cells[2] == f"{np.mean(degraded):.2f} → {np.mean(good):.2f}"
    # Enhancement removed 70% of the noise: every metric must say it is better than its input.
    for r in rows:
        if not r["error"]:
            assert float(r["pesq"]) > float(r["degraded_pesq"])
            assert float(r["si_sdr"]) > float(r["degraded_si_sdr"]) + 5
            assert float(r["lsd"]) < float(r["degraded_lsd"])

    (png,) = figures.glob("*.png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == PNG_MAGIC


def test_manifest_and_missing_counterpart(dataset, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,condition,snr\nnoisy15/u0.wav,easy,15\nu1.wav,hard,5\n")
    extra = tmp_path / "E"
    for rel in ("noisy15/u0.wav", "noisy15/u1.wav", "orphan.wav"):
        save_audio(extra / rel, speech_like(1.0, seed=9), 16000)
    out = tmp_path / "r.csv"
    code = evaluate.main(["--enhanced_dir", str(extra), "--clean_dir", str(dataset["C"]), "--manifest",
                          str(manifest), "--output", str(out), "--workers", "1", "--no_dnsmos"])
    assert code == 1
    conditions = {r["file"]: (r["condition"], r["error"]) for r in read_rows(out)}
    assert conditions["noisy15/u0.wav"] == ("easy", "")  # listed by its enhanced path
    assert conditions["noisy15/u1.wav"] == ("hard", "")  # listed by its clean path
    assert "no clean counterpart" in conditions["orphan.wav"][1]
    captured = capsys.readouterr()
    assert "cannot score orphan.wav: no clean counterpart" in captured.out
    assert "files not in the manifest: 1" in captured.err


@pytest.mark.parametrize("problem", ["missing folder", "no pairs"])
def test_user_errors_exit_2_with_one_line(dataset, tmp_path, capsys, problem):
    enhanced = tmp_path / "nope" if problem == "missing folder" else tmp_path / "E"
    if problem == "no pairs":
        save_audio(enhanced / "unrelated.wav", speech_like(0.5), 16000)
    code = evaluate.main(["--enhanced_dir", str(enhanced), "--clean_dir", str(dataset["C"]),
                          "--output", str(tmp_path / "r.csv"), "--no_dnsmos"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err
    assert ("not found" if problem == "missing folder" else "no pairs found") in lines[0]
    assert not (tmp_path / "r.csv").exists()


def test_summarise_excludes_failed_rows():
    rows = [
        {"file": "a/1.wav", "condition": "a", "pesq": 2.0, "degraded_pesq": 1.0, "error": ""},
        {"file": "a/2.wav", "condition": "a", "pesq": 4.0, "degraded_pesq": 2.0, "error": ""},
        {"file": "a/3.wav", "condition": "a", "error": "enhanced file: empty file (0 samples)"},
        {"file": "b/1.wav", "condition": "b", "pesq": 1.5, "degraded_pesq": 1.5, "error": ""},
    ]
    means = evaluate.condition_means(rows)
    assert means["a"]["n"] == 2 and means["a"]["pesq"] == 3.0 and means["all"]["n"] == 3
    table = evaluate.summarise(rows)
    assert "| a | 2 | 1.50 → 3.00 |" in table and "| all | 3 | 1.50 → 2.50 |" in table


def test_plot_spectrograms_from_arrays(tmp_path):
    clean = speech_like(1.0, seed=5)
    out = evaluate.plot_spectrograms([add_noise(clean, 0, 1), clean], ["noisy", "clean"], tmp_path / "f.png")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000


def test_a_partly_enhanced_or_cut_set_is_counted_and_fails_unless_allowed(tmp_path, capsys):
    """Means over a subset look like means over the set: missing files and files of the wrong length are counted
    under the table, and the exit code is 1 unless --allow_incomplete."""
    clean = [speech_like(2.0, seed=s) for s in (1, 2, 3)]
    for i, c in enumerate(clean):
        save_audio(tmp_path / "C" / f"u{i}.wav", c, 16000)
    save_audio(tmp_path / "E" / "u0.wav", add_noise(clean[0], 20, seed=1), 16000)
    save_audio(tmp_path / "E" / "u1.wav", clean[1][: len(clean[1]) // 2], 16000)  # half as long
    argv = ["--enhanced_dir", str(tmp_path / "E"), "--clean_dir", str(tmp_path / "C"), "--output",
            str(tmp_path / "r.csv"), "--workers", "1", "--no_dnsmos"]
    assert evaluate.main(argv) == 1
    printed = capsys.readouterr().out
    assert "missing: 1 clean files have no enhanced file" in printed and "u2.wav" in printed
    assert "length-mismatched: 1 enhanced files" in printed and "u1.wav" in printed
    assert evaluate.main(argv + ["--allow_incomplete"]) == 0


def test_speaker_viSQOL_and_word_error_metrics_rank_clean_above_degraded(tmp_path, capsys):
    """The opt-in metrics of generative enhancement (evaluate.py --metrics): a recording against itself scores at
    the top (same speaker, ViSQOL's maximum), the noisy version lower on each, and the recogniser makes more word
    errors on it than on the clean recording; in the CLI they are CSV columns and table columns."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    name = "allison_vm_helpexit.wav"
    clean = sf.read(examples / "clean" / name, dtype="float32")[0]
    noisy = sf.read(examples / "degraded" / "noise" / name, dtype="float32")[0]
    transcript = "Press star for help or pound to exit."
    itself = metrics.score_pair(clean, clean, dnsmos=False, extra=metrics.OPTIONAL_METRICS, transcript=transcript)
    degraded = metrics.score_pair(noisy, clean, dnsmos=False, extra=metrics.OPTIONAL_METRICS, transcript=transcript)
    assert itself["spk_sim"] > 0.999 and itself["visqol"] > 4.9
    assert degraded["spk_sim"] < itself["spk_sim"] - 0.05 and degraded["visqol"] < itself["visqol"] - 1.0
    assert 0.0 <= itself["wer"] < degraded["wer"]
    assert metrics.normalise_words("Press 4 [beep] for *help*, or #!") == "press four for star help star or pound"
    # A transcript is the file's own, whatever the recogniser heard before it (scores do not depend on the order
    # in which a worker happens to take the files).
    others = [sf.read(path, dtype="float32")[0] for path in sorted((examples / "degraded" / "noise").glob("*.wav"))[:2]]
    first = metrics.recognise(noisy)
    for other in others:
        metrics.recognise(other)
        assert metrics.recognise(noisy) == first

    out = tmp_path / "scores.csv"
    argv = ["--enhanced_dir", str(examples / "degraded" / "noise"), "--clean_dir", str(examples / "clean"),
            "--output", str(out), "--no_dnsmos", "--workers", "2", "--metrics", "spk_sim,visqol,wer",
            "--transcripts", str(examples / "transcripts.csv")]
    assert evaluate.main(argv) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 5 and all(float(r["wer"]) >= 0 and 0 < float(r["spk_sim"]) <= 1 for r in rows)
    assert "| SpkSim | ViSQOL | WER |" in capsys.readouterr().out
    assert evaluate.main(argv[:-4] + ["--metrics", "mos"]) == 2
    assert "unknown metric 'mos'" in capsys.readouterr().err
    assert evaluate.main(argv[:-2]) == 2
    assert "needs --transcripts" in capsys.readouterr().err


def test_held_out_points_of_continued_runs_keep_their_place_on_the_curve(tmp_path: Path) -> None:
    """A run continued with --init_from counts steps from 0 again: its held-out point at step 1,500 must sit beside
    an earlier leg's step-1,500 point (by compute hours), and scoring the same checkpoint again replaces only it."""
    sys.path.insert(0, str(REPO / "research"))
    from codec_copy_synthesis import append_curve_point

    log = tmp_path / "test_log.csv"
    rows = [{"pesq": 1.2, "estoi": 0.5, "dnsmos_ovrl": 2.5}]
    append_curve_point(log, 7000, 9.7, rows)
    append_curve_point(log, 1500, 2.0, rows)
    append_curve_point(log, 1500, 10.3, [{"pesq": 1.4, "estoi": 0.6, "dnsmos_ovrl": 2.6}])
    append_curve_point(log, 1500, 10.3, [{"pesq": 1.5, "estoi": 0.6, "dnsmos_ovrl": 2.6}])
    with open(log, newline="") as f:
        points = [(float(r["compute_hours"]), int(r["step"]), float(r["value"])) for r in csv.DictReader(f)
                  if r["key"] == "test/pesq"]
    assert points == [(2.0, 1500, 1.2), (9.7, 7000, 1.2), (10.3, 1500, 1.5)]


def test_scores_are_never_written_over_an_input(dataset, tmp_path, capsys):
    """An --output that names a clean recording or the manifest is refused before scoring; both stay as they were."""
    clean = dataset["C"] / "u0.wav"
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,condition\nnoisy5/u0.wav,hard\n")
    before = clean.read_bytes(), manifest.read_text()
    cases = ((clean, [], "named as audio"), (manifest, ["--manifest", str(manifest)], "--manifest"))
    for output, extra, words in cases:
        code = evaluate.main(["--enhanced_dir", str(dataset["E"]), "--clean_dir", str(dataset["C"]), "--output",
                              str(output), "--no_dnsmos", *extra])
        error = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(error) == 1 and words in error[0], error
    assert (clean.read_bytes(), manifest.read_text()) == before

