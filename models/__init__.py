"""Model zoo: the codec and the two token predictors, plus one loader for any enhancer checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from models.codec import Codec
from models.paragse import ParaGSE
from models.serial import SerialEnhancer
from utils import load_checkpoint

ENHANCERS = {ParaGSE.kind: ParaGSE, SerialEnhancer.kind: SerialEnhancer}


def load_enhancer(path: str | Path) -> tuple[torch.nn.Module, Codec]:
    """(token predictor, codec) from one enhancer checkpoint, which carries its codec or names its file."""
    payload = load_checkpoint(path, tuple(ENHANCERS))
    codec = Codec.from_payload(payload["codec"], path)
    return ENHANCERS[payload["kind"]].from_payload(payload, codec, path), codec
