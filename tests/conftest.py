"""Shared fixtures: the repository on sys.path, a real speech clip, the tiny configuration."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils import load_audio  # noqa: E402

TINY_CONFIG = REPO / "configs" / "tiny.json"
EXAMPLES = Path(os.environ.get("PARAGSE_EXAMPLES", REPO / "examples"))

# Tiny models gain nothing from a second thread, and on a busy 2-core machine oversubscribed OpenMP threads
# spin-wait; tests that time or size the paper configuration set their own thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def example_clips() -> list[Path]:
    clips = sorted((EXAMPLES / "clean").glob("*.wav"))
    if not clips:
        raise RuntimeError(f"no clean example clips under {EXAMPLES / 'clean'}; run `python prepare_data.py examples`")
    return clips


@pytest.fixture(scope="session")
def speech() -> np.ndarray:
    """A real recorded speech clip (held-out CC-BY-SA example), 16 kHz mono float32."""
    return load_audio(example_clips()[0])[0]


@pytest.fixture(scope="session")
def other_speech() -> np.ndarray:
    return load_audio(example_clips()[1])[0]
