"""Multi-process training through torchrun (gloo on CPU) and the CUDA paths (skipped without a GPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import inference
import runs
import train
from conftest import REPO, TINY_CONFIG
from models import build_codec, build_enhancer
from models.conformer import GroupedBiLSTM
from utils import load_audio, load_config, save_audio, seed_everything

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _decide_on_two_ranks(rank: int, folder: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        cpu = torch.device("cpu")
        decisions = [runs.on_every_rank(True, cpu), runs.on_every_rank(rank == 0, cpu), runs.on_every_rank(False, cpu)]
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(decisions))
    finally:
        torch.distributed.destroy_process_group()


def test_a_skip_or_stop_is_decided_alike_on_every_rank(tmp_path):
    """A non-finite loss or a stop signal on one torchrun rank must not leave the others waiting in DDP's all-reduce:
    the decision holds on every rank only if it holds on all of them."""
    torch.multiprocessing.spawn(_decide_on_two_ranks, args=(str(tmp_path),), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[True, False, False]] * 2


def test_an_enhancer_builds_from_a_codec_on_another_device():
    """Training builds the enhancer from the frozen codec already on its device (a GPU), so nothing the enhancer
    derives from the codec (the copy prior's code distances) may be made on the CPU; the meta device stands in."""
    config = load_config(REPO / "configs" / "demo_paragse.json")
    codec = build_codec(config["codec"], config["sample_rate"]).to("meta")
    predictor = build_enhancer(config["enhancer"], codec).to("meta")
    assert {t.device.type for t in [*predictor.parameters(), *predictor.buffers()]} == {"meta"}


def test_torchrun_two_processes_train_and_checkpoint(tmp_path, speech):
    save_audio(tmp_path / "data" / "a.wav", speech, 16000)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
         "--stage", "codec", "--config", str(TINY_CONFIG), "--checkpoint_dir", str(tmp_path / "run"),
         "--train_dir", str(tmp_path / "data"), "--max_steps", "3", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = checkpoint.load(tmp_path / "run" / "checkpoint_00000003.pt", "codec")
    assert saved["training"]["step"] == 3
    # DDP keeps the replicas identical, so the one checkpoint rank 0 wrote is the model of both processes.
    checkpoint.load_codec(tmp_path / "run" / "checkpoint_00000003.pt")


@needs_cuda
def test_lstm_recurrences_keep_float32_under_cuda_mixed_precision():
    """cuDNN's RNN would run in float16 under autocast, and bfloat16 training scales no loss: the BiLSTMs opt out."""
    lstm = GroupedBiLSTM(2, 8, 4, 2).cuda()
    x = torch.randn(2, 3, 50, 8, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = lstm(x)
    assert y.dtype == torch.float32
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lstm.parameters())


@needs_cuda
def test_codec_training_runs_on_cuda_with_mixed_precision(tmp_path, speech):
    save_audio(tmp_path / "data" / "a.wav", speech, 16000)
    assert train.main(["--stage", "codec", "--config", str(TINY_CONFIG), "--checkpoint_dir", str(tmp_path / "run"),
                       "--train_dir", str(tmp_path / "data"), "--max_steps", "3", "--device", "cuda"]) == 0
    assert checkpoint.load(tmp_path / "run" / "checkpoint_00000003.pt")["training"]["step"] == 3


@needs_cuda
def test_cuda_and_cpu_enhancement_agree(tmp_path, speech):
    config = load_config(TINY_CONFIG)
    seed_everything(0)
    codec = build_codec(config["codec"], config["sample_rate"])
    model = build_enhancer(config["enhancer"], codec)
    path = tmp_path / "model.pt"
    checkpoint.save(path, checkpoint.enhancer_payload(model, checkpoint.codec_payload(codec), config["inference"]))
    save_audio(tmp_path / "in" / "a.wav", speech[:48000], 16000)
    for device in ("cpu", "cuda"):
        assert inference.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / device),
                               "--checkpoint", str(path), "--device", device, "--save_tokens"]) == 0
    cpu_tokens, cuda_tokens = (np.load(tmp_path / d / "a.tokens.npy") for d in ("cpu", "cuda"))
    assert np.mean(cpu_tokens == cuda_tokens) > 0.99  # TF32/cuDNN may flip a near-tie arg-max
    assert load_audio(tmp_path / "cuda" / "a.wav", 16000)[0].shape[0] == 48000


@needs_cuda
def test_the_shipped_model_blends_with_its_input_on_cuda_as_on_cpu(speech):
    """The demo pair's whole pipeline on the GPU, its blend with the degraded input included (models/input_blend.py)."""
    cpu, cuda = (inference.Enhancer.load(device=device) for device in ("cpu", "cuda"))
    assert cuda.blend is not None and cuda.blend.bin_weights.device.type == "cuda"
    clip = speech[:48000]
    on_cpu, on_cuda = cpu.enhance(clip).audio, cuda.enhance(clip).audio
    assert on_cuda.shape == clip.shape and np.corrcoef(on_cpu, on_cuda)[0, 1] > 0.99


@needs_cuda
def test_enhancer_training_runs_on_cuda_with_mixed_precision_and_pinned_loading(tmp_path, speech):
    """bf16 autocast, pinned batches and the on-the-fly degradation feed a ParaGSE on the GPU; the step counts."""
    save_audio(tmp_path / "data" / "a.wav", speech, 16000)
    save_audio(tmp_path / "noise" / "n.wav", np.random.default_rng(0).standard_normal(32000) * 0.1, 16000)
    config = load_config(TINY_CONFIG)
    seed_everything(0)
    checkpoint.save(tmp_path / "codec.pt", checkpoint.codec_payload(build_codec(config["codec"], 16000)))
    assert train.main(["--stage", "enhancer", "--config", str(TINY_CONFIG), "--codec", str(tmp_path / "codec.pt"),
                       "--checkpoint_dir", str(tmp_path / "run"), "--train_dir", str(tmp_path / "data"),
                       "--noise_dir", str(tmp_path / "noise"), "--max_steps", "3", "--device", "cuda"]) == 0
    saved = checkpoint.load(tmp_path / "run" / "checkpoint_00000003.pt", "enhancer")
    assert saved["training"]["step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


@needs_cuda
def test_benchmark_times_both_pipelines_on_cuda_with_the_tokens_of_cpu():
    import benchmark

    config, serial = load_config(TINY_CONFIG), load_config(REPO / "configs" / "tiny_serial.json")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    systems = [benchmark.build_system("parallel", config, cuda), benchmark.build_system("serial", serial, cuda)]
    wav = torch.from_numpy(benchmark.benchmark_audio(2.0, 16000))[None]
    rtf, _ = benchmark.measure_systems(systems, None, wav.to(cuda), 2.0, 2)
    assert all(0 < rtf[name]["total"] < 10 for name in ("parallel", "serial"))
    with torch.inference_mode():
        on_gpu = systems[0].enhancer.enhance_batch(wav.to(cuda))[1].cpu()
        on_cpu = benchmark.build_system("parallel", config, cpu).enhancer.enhance_batch(wav)[1]
    assert (on_gpu == on_cpu).float().mean() > 0.99  # TF32/cuDNN may flip a near-tie arg-max
