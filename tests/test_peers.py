"""The free enhancers the project is compared with (peers.py), the comparison script, and the speed benchmark of a
trained checkpoint beside them. The peers come from requirements-peers.txt, which `make test` installs."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLES, REPO
from utils import load_audio

import checkpoint
import peers

SCRIPT = REPO / "scripts" / "compare_peers.py"


def installed(name: str) -> bool:
    try:
        peers.load_peers([name])
    except ImportError:
        return False
    return True


def lag(output: np.ndarray, reference: np.ndarray, search: int) -> int:
    """The shift (samples) of `output` against `reference` that correlates best within +-search."""
    core = slice(search, reference.size - search)
    scores = [float(np.dot(output[core], reference[search - s: reference.size - search - s]))
              for s in range(-search, search + 1)]
    return int(np.argmax(scores)) - search


@pytest.mark.parametrize("name", list(peers.PEERS))
def test_a_peer_returns_audio_aligned_with_its_input(name: str) -> None:
    """Intrusive metrics compare samples: a peer's output keeps the input's length and has no delay left."""
    if not installed(name):
        pytest.skip(f"{peers.PEERS[name].package} is not installed (pip install -r requirements-peers.txt)")
    clean_files = sorted((EXAMPLES / "clean").glob("*.wav"))
    clean = load_audio(clean_files[0], 16000)[0]
    noisy = load_audio(EXAMPLES / "degraded" / "noise" / clean_files[0].name, 16000)[0]
    enhanced = peers.load_peers([name])[name](noisy)
    assert enhanced.shape == noisy.shape and enhanced.dtype == np.float32 and np.all(np.isfinite(enhanced))
    assert abs(lag(enhanced, clean, search=640)) <= 16, "more than 1 ms of delay left"


def test_an_unknown_or_missing_peer_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown peer 'deepfilter'"):
        peers.load_peers(["deepfilter"])


@pytest.mark.skipif(not installed("noisereduce"), reason="noisereduce is not installed")
def test_compare_peers_scores_the_model_beside_a_peer_per_condition(tmp_path: Path) -> None:
    out = tmp_path / "peers"
    done = subprocess.run([sys.executable, str(SCRIPT), "--test_dir", str(EXAMPLES), "--output_dir", str(out),
                           "--files", "2", "--peers", "noisereduce", "--no_dnsmos", "--workers", "1",
                           "--threads", "1", "--metrics", "spk_sim", "--log_csv", str(tmp_path / "test_log.csv")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "peers.json").read_text())
    systems = summary["systems"]
    assert list(systems) == ["degraded input", "ParaGSE (this project)", "noisereduce"]
    assert len(summary["files"]) == 2
    for name, result in systems.items():
        assert result["errors"] == 0
        assert set(result["means"]) == {"noise", "reverb", "bandlimit", "clipping", "mixture", "all"}
        assert result["means"]["all"]["n"] == 10 and 1.0 <= result["means"]["all"]["pesq"] <= 4.7
        assert (result["rtf"] is None) == (name == "degraded input")
        assert 0.0 < result["means"]["all"]["spk_sim"] <= 1.0
    table = (out / "peers.md").read_text()
    assert "| noisereduce |" in table and "noise: PESQ / ESTOI / OVRL" in table and "noise: SpkSim" in table
    # The model's means over all conditions, as test points of its learning curve at its step.
    points = list(csv.DictReader(open(tmp_path / "test_log.csv")))
    step = checkpoint.load(REPO / "pretrained" / "demo_paragse.pt")["history"]["step"]
    assert {p["key"] for p in points} == {"test/pesq", "test/estoi"} and {p["step"] for p in points} == {str(step)}
    # The enhanced files are kept, one per condition and file, beside the inputs they came from.
    assert len(list((out / "noisereduce").rglob("*.wav"))) == 10


def test_compare_peers_gives_the_clean_recordings_own_non_intrusive_scores_as_a_reference_row() -> None:
    """DNSMOS and the word error rate need no reference, so the clean targets have scores of their own: the row that
    tells a reader what those metrics say of the speech every system is measured against."""
    spec = importlib.util.spec_from_file_location("compare_peers", SCRIPT)
    compare_peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_peers)
    clean_dir = EXAMPLES / "clean"
    conditions = compare_peers.condition_dirs(EXAMPLES)
    files = compare_peers.select_files(clean_dir, conditions, 2, 1.5)
    rows, reference = compare_peers.score_clean(files, clean_dir, conditions, dnsmos=True, transcripts=None)
    assert [r["error"] for r in rows] == ["", ""] and all(1.0 <= r["dnsmos_ovrl"] <= 5.0 for r in rows)
    assert set(reference["means"]) == set(conditions) | {"all"}
    assert reference["means"]["noise"] == reference["means"]["all"] and reference["means"]["all"]["n"] == 2
    assert reference["means"]["all"]["dnsmos_ovrl"] == pytest.approx(np.mean([r["dnsmos_ovrl"] for r in rows]))
    # Beside a system, its row shows only what was measured, never in bold, and the system's cells keep the bold.
    system = {"rtf": 0.1, "means": {c: {"pesq": 2.0, "estoi": 0.5, "dnsmos_ovrl": 1.0} for c in [*conditions, "all"]}}
    table = compare_peers.table({compare_peers.CLEAN: reference, "system": system})
    ovrl = f"{reference['means']['all']['dnsmos_ovrl']:.2f}"
    assert f"| {compare_peers.CLEAN} | – / – / {ovrl} |" in table and f"**{ovrl}**" not in table
    assert "| system | **2.00** / **0.500** / **1.00** |" in table


def test_compare_peers_refuses_a_folder_without_conditions(tmp_path: Path) -> None:
    (tmp_path / "clean").mkdir()
    clip = sorted((EXAMPLES / "clean").glob("*.wav"))[0]
    (tmp_path / "clean" / clip.name).write_bytes(clip.read_bytes())
    done = subprocess.run([sys.executable, str(SCRIPT), "--test_dir", str(tmp_path), "--output_dir",
                           str(tmp_path / "out"), "--peers", ""], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no condition folder" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists(), "nothing written before the inputs are known to be usable"


def test_benchmark_times_a_trained_checkpoint_stage_by_stage(tmp_path: Path) -> None:
    """benchmark.py --checkpoint: the shipped model's stages, the vocoder (and the blend with the input, where the
    model has one) on its own, and the peers beside it."""
    report = tmp_path / "speed.json"
    command = [sys.executable, str(REPO / "benchmark.py"), "--checkpoint", "--seconds", "2", "--repeats", "1",
               "--threads", "1", "--json", str(report)]
    with_peers = all(installed(name) for name in peers.PEERS)
    done = subprocess.run(command + (["--peers"] if with_peers else []), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(report.read_text())
    stages = result["checkpoint"]["stages"]
    blend = checkpoint.load_enhancer(REPO / "pretrained" / "demo_paragse.pt")[2]["blend"] is not None
    assert result["checkpoint"]["blend"] is blend
    assert set(stages) == {"encoder_and_front", "context", "token_branches", "decoder", "vocoder", "total"} | (
        {"blend"} if blend else set())
    assert all(value > 0 for value in stages.values()) and result["checkpoint"]["rtf"] == stages["total"]
    assert result["checkpoint"]["path"].endswith("demo_paragse.pt")
    if with_peers:
        assert set(result["peers"]) == {"NSNet2", "RNNoise", "noisereduce"}
        assert all(value > 0 for value in result["peers"].values())
    assert "| vocoder |" in done.stdout
