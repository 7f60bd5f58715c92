"""ParaGSE and the serial baseline: batched groups equal a per-group loop, training overfits, inference works."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import inference
import train
from conftest import REPO, TINY_CONFIG
from models import load_enhancer
from models.codec import Codec
from models.conformer import GroupedBiLSTM, GroupedLinear
from models.paragse import ParaGSE, TokenBranches
from utils import load_audio, load_config, save_audio, seed_everything


def test_grouped_lstm_and_linear_match_torch_modules():
    seed_everything(0)
    lstm = GroupedBiLSTM(3, 12, 8, 2)
    linear = GroupedLinear(3, 12, 5)
    x = torch.randn(3, 2, 17, 12)
    y, z = lstm(x), linear(x)
    for g in range(3):
        reference = torch.nn.LSTM(12, 8, 2, batch_first=True, bidirectional=True)
        reference.load_state_dict({
            f"{kind}_l{layer}{suffix}": getattr(lstm, kind)[layer][g, d]
            for layer in range(2) for d, suffix in enumerate(["", "_reverse"])
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        })
        assert (reference(x[g])[0] - y[g]).abs().max() < 1e-5
        dense = torch.nn.Linear(12, 5)
        dense.load_state_dict({"weight": linear.weight[g].t(), "bias": linear.bias[g, 0]})
        assert (dense(x[g]) - z[g]).abs().max() < 1e-5


def _group_slice(batched: TokenBranches, single: TokenBranches, g: int, groups: int) -> None:
    """Copy group g's weights out of the stacked parameters into a one-group module."""
    state = {}
    for name, value in batched.state_dict().items():
        target = single.state_dict()[name]
        if value.dim() and value.shape[0] == groups * target.shape[0]:  # group-major rows (embedding, depthwise conv, BatchNorm)
            size = target.shape[0]
            state[name] = value[g * size : (g + 1) * size]
        else:
            state[name] = value
    single.load_state_dict(state)


def test_batched_group_branches_equal_a_loop_over_groups():
    config = load_config(TINY_CONFIG)
    seed_everything(1)
    groups, codes = 4, 256
    batched = TokenBranches(config, groups, codes).eval()
    for module in batched.modules():  # non-trivial BatchNorm statistics so the check means something
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    branch = torch.randn(2, 30, config["enhancer"]["conformer"]["dim"])
    tokens = torch.randint(0, codes, (2, groups, 30))
    with torch.inference_mode():
        logits = batched(branch, tokens)
        for g in range(groups):
            single = TokenBranches(config, 1, codes).eval()
            _group_slice(batched, single, g, groups)
            reference = single(branch, tokens[:, g : g + 1])
            assert (reference[:, 0] - logits[:, g]).abs().max() < 1e-5


def _write_pair(folder, speech, seconds=2.0, snr_db=5.0):
    clean = speech[: int(seconds * 16000)]
    noise = np.random.default_rng(0).standard_normal(clean.shape[0]).astype(np.float32)
    noise *= np.sqrt(np.mean(clean**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    save_audio(folder / "clean" / "pair.wav", clean)
    save_audio(folder / "noisy" / "pair.wav", clean + noise)
    return folder / "noisy", folder / "clean"


def _tiny_config(tmp_path, quantizer="gvq", segment_length=32280):
    config = json.loads(TINY_CONFIG.read_text())
    config["codec"]["quantizer"] = {"type": quantizer}
    # Longer than the 2 s clip: every draw is the whole pair (zero-padded), one fixed pair to memorise.
    config["enhancer"]["train"]["segment_length"] = segment_length
    config["enhancer"]["train"]["batch_size"] = 1
    path = tmp_path / f"tiny_{quantizer}.json"
    path.write_text(json.dumps(config))
    seed_everything(0)
    codec = Codec.from_config(load_config(path))
    codec.save(tmp_path / f"codec_{quantizer}.pt")
    return path, tmp_path / f"codec_{quantizer}.pt"


def _accuracy(checkpoint, noisy_dir, clean_dir):
    model, codec = load_enhancer(checkpoint)
    degraded = torch.from_numpy(load_audio(noisy_dir / "pair.wav")[0])[None]
    clean = torch.from_numpy(load_audio(clean_dir / "pair.wav")[0])[None]
    with torch.inference_mode():
        degraded_tokens, clean_tokens = codec.encode(degraded), codec.encode(clean)
        predicted = model.predict_tokens(codec.pad(degraded), degraded_tokens)
    return (predicted == clean_tokens).float().mean().item(), (degraded_tokens == clean_tokens).float().mean().item()


@pytest.mark.parametrize("stage,quantizer,steps", [("enhancer", "gvq", 100), ("serial", "rvq", 100)])
def test_tiny_model_overfits_a_real_pair_and_enhances_a_folder(tmp_path, speech, stage, quantizer, steps):
    noisy_dir, clean_dir = _write_pair(tmp_path, speech)
    config, codec = _tiny_config(tmp_path, quantizer)
    argv = ["--stage", stage, "--config", str(config), "--codec", str(codec), "--checkpoint_dir",
            str(tmp_path / "run"), "--train_degraded_dir", str(noisy_dir), "--train_clean_dir", str(clean_dir),
            "--device", "cpu"]
    assert train.main(argv + ["--max_steps", "0"]) == 0
    first = sorted((tmp_path / "run").glob("checkpoint_*.pt"))[-1]
    accuracy_before, copy_before = _accuracy(first, noisy_dir, clean_dir)
    assert train.main(argv + ["--max_steps", str(steps)]) == 0
    last = sorted((tmp_path / "run").glob("checkpoint_*.pt"))[-1]
    accuracy, copy_accuracy = _accuracy(last, noisy_dir, clean_dir)
    assert accuracy > 0.9, f"token accuracy {accuracy_before:.3f} -> {accuracy:.3f}"
    assert copy_accuracy == copy_before < 0.9  # the copy baseline is a property of the data, not the model

    out = tmp_path / "enhanced"
    assert inference.main(["--input_dir", str(noisy_dir), "--output_dir", str(out), "--checkpoint", str(last),
                           "--device", "cpu", "--save_tokens"]) == 0
    enhanced, notes = load_audio(out / "pair.wav")
    assert enhanced.shape[0] == load_audio(noisy_dir / "pair.wav")[0].shape[0] and not notes
    assert np.load(out / "pair.tokens.npy").shape[0] == 4


def test_windowed_enhancement_matches_whole_file_and_keeps_length(tmp_path, speech):
    config = load_config(TINY_CONFIG)
    seed_everything(0)
    codec = Codec.from_config(config)
    model = ParaGSE(config, codec.num_streams, codec.codebook_size)
    whole = inference.Enhancer(codec, model, torch.device("cpu"), window_seconds=60, overlap_seconds=1)
    windowed = inference.Enhancer(codec, model, torch.device("cpu"), window_seconds=1.0, overlap_seconds=0.2,
                                  batch_size=3)
    short = speech[:11111]
    assert np.array_equal(windowed(short).audio, whole(short).audio)  # shorter than a window: same as whole file
    long = np.tile(speech, 3)[: 16000 * 7 + 123]
    result = windowed(long)
    assert result.audio.shape == long.shape
    assert np.isfinite(result.audio).all()
    assert result.tokens.shape == whole(long).tokens.shape


def test_expected_decoding_sharpens_into_argmax_decoding_and_needs_parallel_groups(speech):
    from models.serial import SerialEnhancer
    from utils import UserError

    config = load_config(TINY_CONFIG)
    seed_everything(0)
    codec = Codec.from_config(config)
    model = ParaGSE(config, codec.num_streams, codec.codebook_size)
    clip = speech[:16000]

    def enhance(**decoding):
        return inference.Enhancer(codec, model, torch.device("cpu"), 60, 1, **decoding)(clip)

    argmax, sharp, soft = enhance(), enhance(decoding="expected", temperature=1e-4), enhance(decoding="expected")
    assert np.array_equal(sharp.tokens, argmax.tokens) and np.array_equal(soft.tokens, argmax.tokens)
    assert np.allclose(sharp.audio, argmax.audio, atol=1e-4)  # a near one-hot distribution is its arg-max
    assert not np.allclose(soft.audio, argmax.audio, atol=1e-3)
    with pytest.raises(UserError, match="inference.temperature"):
        enhance(decoding="expected", temperature=0.0)

    config["codec"]["quantizer"]["type"] = "rvq"
    rvq_codec = Codec.from_config(config)
    with pytest.raises(UserError, match="serial baseline"):
        inference.Enhancer(rvq_codec, SerialEnhancer(config, rvq_codec), torch.device("cpu"), 60, 1,
                           decoding="expected")


def test_ten_minute_recording_stays_within_memory_at_paper_configuration(tmp_path, speech):
    """Paper-size ParaGSE (random weights) on 10 minutes of speech: windowed, bounded memory, exact length."""
    script = """
import resource, sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(2)
from inference import Enhancer
from models.codec import Codec
from models.paragse import ParaGSE
from utils import load_config, seed_everything
config = load_config()
seed_everything(0)
codec = Codec.from_config(config)
model = ParaGSE(config, codec.num_streams, codec.codebook_size)
speech = np.load(sys.argv[2])
audio = np.tile(speech, 600 * 16000 // len(speech) + 1)[: 600 * 16000 + 77]
enhancer = Enhancer(codec, model, torch.device("cpu"), config["inference"]["window_seconds"],
                    config["inference"]["overlap_seconds"])
out = enhancer(audio).audio
print(out.shape[0], audio.shape[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    np.save(tmp_path / "speech.npy", speech)
    result = subprocess.run([sys.executable, "-c", script, str(REPO), str(tmp_path / "speech.npy")],
                            capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    out_length, in_length, peak_mb = result.stdout.split()
    assert int(out_length) == int(in_length)
    assert float(peak_mb) < 2500, f"peak RSS {peak_mb} MB"


def test_init_from_carries_trained_weights_onto_a_new_codec(tmp_path, speech, capsys):
    noisy_dir, clean_dir = _write_pair(tmp_path, speech)
    config, codec = _tiny_config(tmp_path)
    data = ["--train_degraded_dir", str(noisy_dir), "--train_clean_dir", str(clean_dir), "--device", "cpu"]
    common = ["--stage", "enhancer", "--config", str(config), *data]
    assert train.main(common + ["--codec", str(codec), "--checkpoint_dir", str(tmp_path / "a"), "--max_steps", "3"]) == 0
    trained = sorted((tmp_path / "a").glob("checkpoint_*.pt"))[-1]
    seed_everything(1)
    retrained_codec = Codec.from_config(load_config(config))
    retrained_codec.save(tmp_path / "codec_b.pt")
    argv = common + ["--codec", str(tmp_path / "codec_b.pt"), "--checkpoint_dir", str(tmp_path / "b"),
                     "--init_from", str(trained), "--max_steps", "0"]
    assert train.main(argv) == 0
    model_a, _ = load_enhancer(trained)
    model_b, codec_b = load_enhancer(tmp_path / "b" / "checkpoint_00000000.pt")
    assert all(torch.equal(v, model_b.state_dict()[k]) for k, v in model_a.state_dict().items())
    assert all(torch.equal(v, codec_b.state_dict()[k]) for k, v in retrained_codec.state_dict().items())
    started = torch.load(tmp_path / "b" / "checkpoint_00000000.pt", weights_only=False)
    assert started["step"] == 0  # a new run, whose compute time carries on from the weights it started from
    assert started["compute_seconds"] >= torch.load(trained, weights_only=False)["compute_seconds"] > 0

    wrong = common + ["--codec", str(codec), "--checkpoint_dir", str(tmp_path / "c"), "--init_from", str(codec)]
    assert train.main(wrong) == 2
    assert "codec_gvq.pt" in capsys.readouterr().err


def test_shipped_demo_model_is_one_enhancer_that_names_its_codec_within_25_mb(speech):
    """The demo pair a fresh clone runs: the enhancer names the codec beside it, together at most 25 MB."""
    enhancer_path, codec_path = REPO / "pretrained" / "demo_paragse.pt", REPO / "pretrained" / "demo_codec.pt"
    assert enhancer_path.stat().st_size + codec_path.stat().st_size <= 25_000_000
    reference = torch.load(enhancer_path, map_location="cpu", weights_only=False)["codec"]
    assert reference["kind"] == "codec_reference" and reference["file"] == codec_path.name
    predictor, codec = load_enhancer(enhancer_path)
    shipped_codec = Codec.load(codec_path)
    wav = torch.from_numpy(speech)[None]
    with torch.inference_mode():
        padded = codec.pad(wav)
        degraded_tokens = codec.encode(padded)
        assert torch.equal(degraded_tokens, shipped_codec.encode(padded))
        tokens = predictor.predict_tokens(padded, degraded_tokens)
    assert tokens.shape == degraded_tokens.shape and tokens.shape[1] == codec.num_streams
