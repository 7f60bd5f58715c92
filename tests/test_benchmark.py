"""benchmark.py end to end on the tiny configuration, and the speed work's promise: outputs do not change."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import benchmark
import inference
from conftest import EXAMPLES, REPO, TINY_CONFIG
from models.codec import Codec
from models.conformer import GroupedBiLSTM, GroupedLinear, split_groups
from models.int8 import QuantizedGroupedBiLSTM, QuantizedGroupedLinear
from models.paragse import ParaGSE
from models.serial import SerialEnhancer
from utils import load_audio, load_config, save_audio, save_checkpoint, seed_everything

REQUIRED = ("rtf_parallel", "rtf_serial", "speedup", "rtf_bound", "params_parallel", "params_serial",
            "gflops_per_second_parallel", "gflops_per_second_serial", "matmul_gflops", "threads", "stages_parallel",
            "stages_serial", "length_scaling", "batch_throughput", "rtf_quantized", "token_agreement")


def test_benchmark_end_to_end_on_the_tiny_configuration(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PARAGSE_EXAMPLES": str(EXAMPLES)}
    done = subprocess.run([sys.executable, str(REPO / "benchmark.py"), "--config", str(TINY_CONFIG), "--lengths",
                           "2,4", "--seconds", "2", "--repeats", "1", "--quantize", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| RTF: total |" in done.stdout
    r = json.loads(out.read_text())
    assert all(key in r for key in REQUIRED), [key for key in REQUIRED if key not in r]
    assert r["threads"] == 2 and r["matmul_gflops"] > 0
    for stages in (r["stages_parallel"], r["stages_serial"]):
        assert set(benchmark.STAGES) <= set(stages) and all(v > 0 for v in stages.values())
    assert r["rtf_parallel"] > 0 and r["rtf_serial"] > 0 and r["rtf_quantized"] > 0 and r["rtf_bound"] > 0
    assert math.isclose(r["speedup"], r["rtf_serial"] / r["rtf_parallel"], rel_tol=1e-9)
    assert r["gflops_per_second_serial"] > 0 and r["gflops_per_second_parallel"] > 0
    assert r["params_parallel"]["predictor"] > 0 and r["params_serial"]["codec_decoder"] > 0
    assert 0.0 <= r["token_agreement"] <= 1.0
    assert [x["seconds"] for x in r["length_scaling"]] == [2, 4]
    assert all(x["rtf"] > 0 and x["peak_rss_mb"] > 0 for x in r["length_scaling"])
    assert [x["batch_size"] for x in r["batch_throughput"]] == [1, 4]
    assert all(x["audio_seconds_per_second"] > 0 for x in r["batch_throughput"])


def test_analytic_lstm_flops_match_a_counted_unrolled_lstm():
    """8 * H * (I + H) per frame, layer and direction: what the counter reports for the same products unrolled."""
    groups, inputs, hidden, layers, frames = 2, 6, 5, 2, 7
    lstm = GroupedBiLSTM(groups, inputs, hidden, layers)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for g in range(groups):
            for layer in range(layers):
                for direction in range(2):
                    w_ih, w_hh = lstm.weight_ih[layer][g, direction], lstm.weight_hh[layer][g, direction]
                    h = torch.zeros(1, hidden)
                    for _ in range(frames):
                        torch.mm(torch.zeros(1, w_ih.shape[1]), w_ih.t()) + torch.mm(h, w_hh.t())
    assert benchmark.lstm_flops(lstm, frames, batch=1) == counter.get_total_flops()


def _nontrivial_norms(model: torch.nn.Module) -> None:
    """Random BatchNorm statistics and GRN parameters (they start as identities, which would hide a mistake)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
            if hasattr(module, "gamma") and hasattr(module, "beta"):
                module.gamma.uniform_(-1.0, 1.0)
                module.beta.uniform_(-0.1, 0.1)


def _with_threads(threads: int, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return fn()
    finally:
        torch.set_num_threads(previous)


def test_concurrent_inference_is_bit_identical_to_the_sequential_path(speech):
    """With 2 threads the groups, LSTM directions and encoder/branch run as concurrent tasks; with 1 thread every
    module takes its original sequential path. Logits and tokens must be identical, bit for bit; the audio too up to
    the decoder's fast path, whose sums may split differently over 1 or 2 threads."""
    config = load_config(TINY_CONFIG)
    seed_everything(0)
    codec = Codec.from_config(config).eval()
    model = ParaGSE(config, codec.num_streams, codec.codebook_size).eval()
    _nontrivial_norms(model)
    wav = torch.from_numpy(np.stack([speech[:24000], speech[8000:32000]]))
    padded = codec.pad(wav)
    enhancer = inference.Enhancer(codec, model, torch.device("cpu"), window_seconds=60, overlap_seconds=1)

    def run():
        tokens = codec.encode(padded)
        return model(padded, tokens), enhancer.enhance_batch(wav)

    (logits_1, (audio_1, tokens_1)), (logits_2, (audio_2, tokens_2)) = _with_threads(1, run), _with_threads(2, run)
    assert torch.equal(logits_1, logits_2) and torch.equal(tokens_1, tokens_2)
    assert (audio_1 - audio_2).abs().max() < 1e-5
    assert torch.equal(tokens_1, logits_1.argmax(-1))  # the pipeline predicts what the model's logits say


def test_bidirectional_lstm_split_by_direction_equals_the_fused_kernel():
    seed_everything(0)
    lstm = GroupedBiLSTM(1, 12, 8, 2).eval()
    x = torch.randn(1, 2, 40, 12)
    with torch.inference_mode():
        assert torch.equal(lstm._group_by_direction(x[0], 0), lstm._group(x[0], 0))


def test_serial_pipeline_split_matches_predict_tokens(speech):
    config = load_config(TINY_CONFIG)
    config["codec"]["quantizer"]["type"] = "rvq"
    seed_everything(0)
    codec = Codec.from_config(config).eval()
    model = SerialEnhancer(config, codec).eval()
    padded = codec.pad(torch.from_numpy(speech[:16000])[None])
    with torch.inference_mode():
        tokens = codec.encode(padded)
        assert torch.equal(model.tokens_from_condition(model.condition(padded), tokens),
                           model.predict_tokens(padded, tokens))


def test_fast_decoder_path_matches_the_exact_path_and_encoder_stays_exact(speech):
    """The decoder's frames-last, fused-GRN path changes only rounding; the encoder (tokens) keeps the exact one."""
    seed_everything(0)
    codec = Codec.from_config(load_config()).eval()
    _nontrivial_norms(codec)
    assert codec.encoder.trunk.exact and not codec.decoder.trunk.exact
    with torch.inference_mode():
        tokens = codec.encode(torch.from_numpy(np.stack([speech[:31960], speech[4000:35960]])))
        fast = codec.decode(tokens)
        codec.decoder.trunk.exact = True
        exact = codec.decode(tokens)
    assert (fast - exact).abs().max() < 1e-5
    with torch.no_grad():  # with gradients off but outside inference mode the fast path runs too
        codec.decoder.trunk.exact = False
        assert (codec.decode(tokens) - exact).abs().max() < 1e-5


def test_quantized_grouped_modules_approximate_the_float_ones_per_group_part():
    seed_everything(0)
    linear, lstm = GroupedLinear(3, 16, 24), GroupedBiLSTM(3, 16, 8, 2).eval()
    x = torch.randn(3, 2, 20, 16)
    q_linear, q_lstm = QuantizedGroupedLinear(linear), QuantizedGroupedBiLSTM(lstm)
    part = slice(1, 3)
    with torch.inference_mode():
        for reference, quantized in ((linear(x), q_linear(x)), (lstm(x), q_lstm(x)),
                                     (linear(x[part], part), q_linear(x[part], part)),
                                     (lstm(x[part], part), q_lstm(x[part], part))):
            assert quantized.shape == reference.shape
            assert (quantized - reference).abs().max() < 0.05 * reference.abs().max()


def test_split_groups_covers_every_group_once():
    assert split_groups(4, 2) == [slice(0, 2), slice(2, 4)]
    assert split_groups(1, 2) == [slice(0, 1)]
    assert split_groups(5, 3) == [slice(0, 2), slice(2, 3), slice(3, 5)]


def test_inference_quantize_flag_enhances_a_folder(tmp_path, speech):
    config = load_config(TINY_CONFIG)
    seed_everything(0)
    codec = Codec.from_config(config)
    model = ParaGSE(config, codec.num_streams, codec.codebook_size)
    save_checkpoint(tmp_path / "paragse.pt", model.checkpoint_payload(codec.checkpoint_payload()))
    save_audio(tmp_path / "in" / "clip.wav", speech[:20000])
    argv = ["--input_dir", str(tmp_path / "in"), "--checkpoint", str(tmp_path / "paragse.pt"), "--device", "cpu"]
    assert inference.main(argv + ["--output_dir", str(tmp_path / "int8"), "--quantize", "--save_tokens"]) == 0
    assert load_audio(tmp_path / "int8" / "clip.wav")[0].shape == (20000,)
    assert np.load(tmp_path / "int8" / "clip.tokens.npy").shape[0] == codec.num_streams
    assert inference.main(argv + ["--output_dir", str(tmp_path / "codec"), "--codec_only", "--quantize"]) == 2
