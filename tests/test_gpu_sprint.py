"""The GPU sprint: its pack stays within the transfer limits, and its smoke run does every stage and returns only
what a lent machine can hand back."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import inference
from conftest import REPO
from utils import UserError, save_audio

sys.path.insert(0, str(REPO / "scripts"))
import make_gpu_pack  # noqa: E402

MIB = 2**20


def test_a_checkpoint_written_in_parts_loads_whole_and_a_missing_part_is_named(tmp_path):
    payload = {"format": checkpoint.FORMAT, "kind": "codec", "config": {}, "model": {"w": torch.arange(300000.0)}}
    path = tmp_path / "big.pt"
    checkpoint.save(path, payload, part_bytes=400_000)
    parts = checkpoint.part_files(path)
    assert not path.exists() and len(parts) >= 3 and all(p.stat().st_size <= 400_000 for p in parts)
    assert torch.equal(checkpoint.load(path)["model"]["w"], payload["model"]["w"])
    checkpoint.save(path, payload)  # saved whole again: the parts of the earlier save go
    assert path.is_file() and checkpoint.part_files(path) == []
    checkpoint.save(path, payload, part_bytes=400_000)
    checkpoint.part_files(path)[1].unlink()
    with pytest.raises(UserError, match="incomplete"):
        checkpoint.load(path)


def test_the_pack_fills_its_budget_with_every_speaker_and_noise_and_no_more(tmp_path):
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    for speaker in ("alice", "bob", "carol"):
        for i in range(6):
            save_audio(corpus / "train" / "src" / speaker / f"{i}.wav", 0.1 * rng.standard_normal(32000), 16000)
    for kind in ("rain", "music"):
        save_audio(corpus / "noise" / "train" / kind / "a.wav", 0.1 * rng.standard_normal(48000), 16000)
    save_audio(corpus / "rir" / "train" / "r.wav", np.exp(-np.arange(3200) / 400.0), 16000)
    for condition in ("clean", "noise"):
        save_audio(tmp_path / "valid_sets" / condition / "v.wav", 0.1 * rng.standard_normal(16000), 16000)
    tracked = make_gpu_pack.tracked_bytes()
    limit = (tracked + 250_000) / MIB
    report = make_gpu_pack.build_pack(corpus, tmp_path / "valid_sets", tmp_path / "pack", limit, 0.7, wheels=False)
    assert report["total_bytes"] <= limit * MIB
    speech = list((tmp_path / "pack" / "speech").rglob("*.ogg"))
    assert 3 <= len(speech) < 18  # a subset, taken round-robin: every speaker is in it
    assert {p.parent.name for p in speech} == {"alice", "bob", "carol"}
    assert {p.parent.name for p in (tmp_path / "pack" / "noise").rglob("*.ogg")} == {"rain", "music"}
    assert json.loads((tmp_path / "pack" / "pack.json").read_text())["pack_bytes"] == report["pack_bytes"]


def test_the_smoke_sprint_runs_every_stage_and_returns_only_what_a_lent_machine_hands_back(tmp_path, speech):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "scripts/gpu_sprint.py", "--output_dir", str(out), "--smoke", "--device",
                           "cpu"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"cuda_tests", "train_throughput", "inference_rtf", "training"}
    tests = report["cuda_tests"]["tests"]
    assert tests and all(t["outcome"] in ("passed", "skipped") for t in tests.values())
    runs = report["train_throughput"]["runs"]
    assert {(r["name"], r["precision"]) for r in runs} >= {("codec", "fp32"), ("codec", "bf16"), ("paragse", "fp32"),
                                                           ("paragse", "bf16"), ("serial", "bf16")}
    assert all(r["steps_per_second"] > 0 and 0 <= r["data_wait_fraction"] <= 1 for r in runs)
    rtf = report["inference_rtf"]
    assert rtf["rtf_parallel"] > 0 and rtf["serial_over_parallel"] > 0 and rtf["windowed_rtf"]["by_batch_size"]
    training = report["training"]
    assert training["steps"] == training["planned_steps"] and (out / "log.csv").is_file()
    scores = training["validation"]["scores"]
    assert all(-1 <= scores[name]["estoi"] <= 1 for name in ("new", "shipped", "input"))  # an untrained model may be below 0

    # What came back, checked here against the limits themselves rather than the script's own check.
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) <= 8 and sum(f.stat().st_size for f in files) <= 64 * MIB
    assert all(f.stat().st_size <= 16 * MIB and len(f.relative_to(out).parts) <= 3 for f in files)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for f in files for part in f.relative_to(out).parts)
    assert report["output_files"]["problems"] == []

    # The weights load as exported (joined if in parts) beside the codec they name, and enhance.
    (out / "demo_codec.pt").symlink_to(REPO / "pretrained" / "demo_codec.pt")
    enhancer = inference.Enhancer.load(out / "gpu_paragse.pt", device="cpu")
    assert enhancer.enhance(speech[:16000]).audio.shape == (16000,)
