"""Multi-process training through torchrun (gloo on CPU) and the CUDA paths (skipped without a GPU)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import inference
import train
from conftest import REPO, TINY_CONFIG
from models.codec import Codec
from utils import load_audio, save_audio

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_torchrun_two_processes_train_and_checkpoint(tmp_path, speech):
    save_audio(tmp_path / "data" / "a.wav", speech)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
         "--stage", "codec", "--config", str(TINY_CONFIG), "--checkpoint_dir", str(tmp_path / "run"),
         "--train_dir", str(tmp_path / "data"), "--max_steps", "3", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / "run" / "checkpoint_00000003.pt", weights_only=False)
    assert saved["step"] == 3
    # DDP keeps the replicas identical, so the one checkpoint rank 0 wrote is the model of both processes.
    Codec.from_payload(saved, "ddp checkpoint")


@needs_cuda
def test_codec_training_runs_on_cuda_with_mixed_precision(tmp_path, speech):
    save_audio(tmp_path / "data" / "a.wav", speech)
    assert train.main(["--stage", "codec", "--config", str(TINY_CONFIG), "--checkpoint_dir", str(tmp_path / "run"),
                       "--train_dir", str(tmp_path / "data"), "--max_steps", "3", "--device", "cuda"]) == 0
    assert torch.load(tmp_path / "run" / "checkpoint_00000003.pt", weights_only=False)["step"] == 3


@needs_cuda
def test_cuda_and_cpu_enhancement_agree(tmp_path, speech):
    from models.paragse import ParaGSE
    from utils import load_config, seed_everything

    config = load_config(TINY_CONFIG)
    seed_everything(0)
    codec = Codec.from_config(config)
    model = ParaGSE(config, codec.num_streams, codec.codebook_size)
    path = tmp_path / "model.pt"
    torch.save(model.checkpoint_payload(codec.checkpoint_payload()), path)
    save_audio(tmp_path / "in" / "a.wav", speech[:48000])
    for device in ("cpu", "cuda"):
        assert inference.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / device),
                               "--checkpoint", str(path), "--device", device, "--save_tokens"]) == 0
    cpu_tokens, cuda_tokens = (np.load(tmp_path / d / "a.tokens.npy") for d in ("cpu", "cuda"))
    assert np.mean(cpu_tokens == cuda_tokens) > 0.99  # TF32/cuDNN may flip a near-tie arg-max
    assert load_audio(tmp_path / "cuda" / "a.wav")[0].shape[0] == 48000
