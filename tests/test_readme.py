"""Every command a reader is told to run, in README.md and MODEL_CARD.md, runs here on small stand-ins.

The commands are read from the documents' ```bash blocks, not copied into this file, so a command that changes in
the documents is tested as it now reads. Each runs as written in a scratch folder laid out like the repository,
with the substitutions listed in SUBSTITUTIONS (tiny configurations, a few training steps, example clips in place
of corpora the test machine does not have). Training commands must leave a checkpoint behind.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from conftest import EXAMPLES, REPO, example_clips

DOCUMENTS = ("README.md", "MODEL_CARD.md")
# Commands that are not run here, and why.
NOT_RUN = {
    "make test": "it is the command that runs this test",
    "bash scripts/make_corpus.sh": "installs Debian packages as root (apt) and takes minutes; tests/test_data.py "
                                   "covers the corpus builders it calls",
    "pip install -r requirements-peers.txt": "`make test` installs the peers before the tests run",
    "python scripts/gpu_sprint.py --output_dir OUT --pack pack --minutes 9 --device cuda": "needs a GPU; the smoke "
                                                                                          "run has every stage",
    "python scripts/gpu_sprint.py --output_dir /tmp/sprint --smoke --device cpu": "tests/test_gpu_sprint.py runs it",
}
TRAINING_STEPS = 2
SUBSTITUTIONS = [  # (pattern, replacement), applied in order to each command
    (r"^(\.venv/bin/)?python ", f"{sys.executable} "),
    (r"^torchrun --nproc_per_node \d+", f"{sys.executable} -m torch.distributed.run --nproc_per_node 2"),
    (r"^tensorboard --logdir", f"{sys.executable} -m tensorboard.main --inspect --logdir"),
    # The paper configuration trains at ~13 CPU-s a step; the tiny one keeps every code path.
    (r"--config config\.json", "--config configs/tiny.json"),
    (r"--config configs/serial\.json", "--config configs/tiny_serial.json"),
    # k-means of 16 x 1,024 codes on 4,096 segments takes minutes; the stand-in fits them on 64 segments.
    (r"--config configs/demo_codec\.json", "--config small_demo_codec.json"),
    (r"checkpoint_00700000\.pt", f"checkpoint_{TRAINING_STEPS:08d}.pt"),
    (r"--train_degraded_dir \.\.\. --train_clean_dir \.\.\.",
     "--train_degraded_dir vb16k/noisy_trainset_28spk_wav --train_clean_dir vb16k/clean_trainset_28spk_wav"),
    (r"train\.py --stage enhancer \.\.\.$",
     "train.py --stage enhancer --config configs/tiny.json --codec runs/codec/checkpoint_00000002.pt "
     "--checkpoint_dir runs/paragse_ddp --train_degraded_dir vb16k/noisy_trainset_28spk_wav "
     "--train_clean_dir vb16k/clean_trainset_28spk_wav"),
    (r"^(\S+) benchmark\.py .*", r"\1 benchmark.py --config configs/tiny.json --seconds 2 --repeats 1 --lengths 2 "
                                r"--batch_sizes 1 --json benchmark.json"),
    (r"--checkpoint my_paragse\.pt", "--checkpoint pretrained/demo_paragse.pt"),
    # Six systems x every metric on 30 files takes minutes; one file, one peer and one opt-in metric keep the path.
    (r"(compare_peers\.py .*) --metrics \S+ --transcripts \S+ (.*)",
     r"\1 \2 --files 1 --peers noisereduce --metrics spk_sim --no_dnsmos --workers 1"),
    # k-means of 1,024 codes needs more frames than the five example clips have.
    (r"(mel_vq_oracle\.py .*) --codebooks .*", r"\1 --codebooks 4x16"),
    # The wheels come from PyPI: the pack's test (tests/test_gpu_sprint.py) leaves them out as well.
    (r"(make_gpu_pack\.py)$", r"\1 --no_wheels"),
    (r"^make demo$", f"make -o .venv/.installed demo PY={sys.executable} DEMO_ARGS='--output_dir demo_out --no_dnsmos'"),
]


def document_commands(document: str) -> list[str]:
    """The shell commands of a Markdown document's ```bash blocks: continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / document).read_text(), flags=re.S):
        for command in re.sub(r"\\\n\s*", "", block).splitlines():
            command = command.split(" #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def substitute(command: str, workspace: Path) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        command = re.sub(pattern, replacement, command)
    # The model card names the checkpoints of its full-length runs; here those runs are a few steps long.
    for named in re.findall(r"(?:training|runs)/\S+/checkpoint_\d+\.pt", command):
        if not (workspace / named).exists():
            command = command.replace(named, str(sorted((workspace / named).parent.glob("checkpoint_*.pt"))[-1]))
    if " train.py " in command:
        command += f" --max_steps {TRAINING_STEPS} --threads 1"
    return command


def _write_48k(path: Path, audio: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, soxr.resample(audio, 16000, 48000), 48000, subtype="PCM_16")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder laid out like the repository, with small stand-ins for the data the documents name."""
    root = tmp_path_factory.mktemp("readme")
    # Code and configuration are linked (read only); everything a command may write to is a copy or absent.
    for item in REPO.iterdir():
        if item.suffix in {".py", ".json", ".txt", ".md"} or item.name in {
                "Makefile", "models", "configs", "scripts", "examples", "research", "data_prep", "docs", "training"}:
            (root / item.name).symlink_to(item)
    shutil.copytree(REPO / "pretrained", root / "pretrained")
    clean = [sf.read(p, dtype="float32")[0] for p in example_clips()]
    noisy = [sf.read(EXAMPLES / "degraded" / "noise" / p.name, dtype="float32")[0] for p in example_clips()]
    # VoiceBank+DEMAND as downloaded (48 kHz), and LibriTTS stand-ins.
    for split, speaker in (("trainset_28spk", "p226"), ("testset", "p232")):
        for i, (c, n) in enumerate(zip(clean, noisy)):
            _write_48k(root / "DS_10283_2791" / f"clean_{split}_wav" / f"{speaker}_{i:03d}.wav", c)
            _write_48k(root / "DS_10283_2791" / f"noisy_{split}_wav" / f"{speaker}_{i:03d}.wav", n)
    for folder in ("LibriTTS/train", "LibriTTS/dev-clean", "clean", "data/corpus/train", "data/corpus/valid",
                   "data/corpus/test"):
        shutil.copytree(EXAMPLES / "clean", root / folder, ignore=shutil.ignore_patterns("*.txt", "*.csv"))
    shutil.copytree(EXAMPLES / "degraded" / "noise", root / "noisy")
    shutil.copytree(EXAMPLES / "clean", root / "data/valid_sets/clean", ignore=shutil.ignore_patterns("*.csv"))
    shutil.copytree(EXAMPLES / "degraded" / "noise", root / "data/valid_sets/noise")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (root / "data/corpus/noise" / split).mkdir(parents=True)
        (root / "data/corpus/rir" / split).mkdir(parents=True)
        for i in range(3):
            noise = 0.1 * rng.standard_normal(3 * 16000)
            sf.write(root / "data/corpus/noise" / split / f"noise_{i}.wav", noise.astype(np.float32), 16000)
            rir = np.exp(-np.arange(4000) / 800.0) * rng.standard_normal(4000)
            sf.write(root / "data/corpus/rir" / split / f"rir_{i}.wav", (rir / np.abs(rir).max()).astype(np.float32),
                     16000)
    (root / "small_demo_codec.json").write_text(json.dumps({
        "base": str(REPO / "configs" / "demo_codec.json"),
        "codec_training": {"init_segments": 64, "kmeans_iterations": 5}}))
    return root


def _cases() -> list:
    cases = []
    for document in DOCUMENTS:
        for command in document_commands(document):
            marks = [pytest.mark.skip(reason=NOT_RUN[command])] if command in NOT_RUN else []
            cases.append(pytest.param(command, id=f"{document}: {command[:60]}", marks=marks))
    return cases


def test_the_documents_have_commands() -> None:
    assert len(document_commands("README.md")) >= 12
    assert any("train.py --stage codec" in c for c in document_commands("MODEL_CARD.md"))


@pytest.mark.parametrize("command", _cases())
def test_documented_command_runs(command: str, workspace: Path) -> None:
    """Commands run in document order (the later ones use what the earlier ones trained)."""
    runnable = substitute(command, workspace)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PARAGSE_EXAMPLES": str(EXAMPLES)}
    done = subprocess.run(runnable, shell=True, cwd=workspace, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{runnable}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    argv = shlex.split(runnable)
    if "train.py" in argv:
        folder = workspace / argv[argv.index("--checkpoint_dir") + 1]
        last_max_steps = int(argv[len(argv) - argv[::-1].index("--max_steps")])  # the last one given wins
        assert (folder / f"checkpoint_{last_max_steps:08d}.pt").is_file(), done.stderr[-2000:]
    if "checkpoint.py" in argv and "export" in argv:  # checkpoint.py export CHECKPOINT OUTPUT [options]
        assert (workspace / argv[argv.index("export") + 2]).is_file()
