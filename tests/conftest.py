"""Shared fixtures: the repository on sys.path, a real speech clip, the tiny configurations, short training runs."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils import load_audio, save_audio  # noqa: E402

TINY_CONFIG = REPO / "configs" / "tiny.json"
TINY_SERIAL_CONFIG = REPO / "configs" / "tiny_serial.json"
DEMO_CODEC_CONFIG = REPO / "configs" / "demo_codec.json"
EXAMPLES = Path(os.environ.get("PARAGSE_EXAMPLES", REPO / "examples"))

# Tiny models gain nothing from a second thread, and on a busy 2-core machine oversubscribed OpenMP threads
# spin-wait; tests that time or size the paper configuration set their own thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """Every test starts with the thread count above: a tool run in-process with --threads must not change the
    arithmetic (or the speed) of the tests after it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def example_clips() -> list[Path]:
    clips = sorted((EXAMPLES / "clean").glob("*.wav"))
    if not clips:
        raise RuntimeError(f"no clean example clips under {EXAMPLES / 'clean'}; run `python prepare_data.py examples`")
    return clips


@pytest.fixture(scope="session")
def speech() -> np.ndarray:
    """A real recorded speech clip (held-out CC-BY-SA example), 16 kHz mono float32."""
    return load_audio(example_clips()[0], 16000)[0]


@pytest.fixture(scope="session")
def other_speech() -> np.ndarray:
    return load_audio(example_clips()[1], 16000)[0]


@pytest.fixture()
def clip_dir(tmp_path: Path, speech: np.ndarray) -> Path:
    """A training folder holding the one speech clip."""
    folder = tmp_path / "clip"
    save_audio(folder / "speech.wav", speech, 16000)
    return folder


def write_config(path: Path, overrides: dict) -> Path:
    """A config file at `path` with `overrides`; a "base" given relative to configs/ is made absolute."""
    if "base" in overrides:
        overrides = overrides | {"base": str(REPO / "configs" / overrides["base"])}
    path.write_text(json.dumps(overrides))
    return path


def tiny_mel_config(folder: Path, **sections: dict) -> Path:
    """The demo codec (class MelCodec) shrunk to train in a second: 16 codes a group, a one-block decoder, k-means on
    32 segments. `sections` are laid over it, section by section (e.g. run={"log_every": 1})."""
    config = {"base": "demo_codec.json",
              "codec": {"quantizer": {"codebook_size": 16}, "decoder": {"dim": 32, "intermediate_dim": 64,
                                                                        "num_blocks": 1}},
              "codec_training": {"init_segments": 32, "kmeans_iterations": 3, "batch_size": 4},
              "data": {"num_workers": 0}, "run": {"validation_dnsmos": False}}
    for name, values in sections.items():
        config[name] = config.get(name, {}) | values
    return write_config(folder / "tiny_mel.json", config)


def train_codec(config: Path, run_dir: Path, train_dir: Path, max_steps: int, *extra: str) -> Path:
    """Train (or resume) a codec run in-process for `max_steps` steps on CPU; returns its newest checkpoint."""
    import train

    argv = ["--stage", "codec", "--config", str(config), "--checkpoint_dir", str(run_dir), "--train_dir",
            str(train_dir), "--max_steps", str(max_steps), "--device", "cpu", *extra]
    assert train.main(argv) == 0
    return latest_checkpoint(run_dir)


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint_*.pt of a training run folder."""
    found = sorted(Path(run_dir).glob("checkpoint_*.pt"))
    assert found, f"no checkpoint in {run_dir}"
    return found[-1]
