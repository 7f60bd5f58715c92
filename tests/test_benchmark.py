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
import checkpoint
import cpu_speed
import inference
from conftest import EXAMPLES, REPO, TINY_CONFIG
from models import Codec, build_codec, build_enhancer
from models.conformer import GroupedBiLSTM, GroupedLinear
from models.int8 import QuantizedGroupedBiLSTM, QuantizedGroupedLinear
from utils import load_audio, load_config, save_audio, seed_everything

TINY_SERIAL_CONFIG = REPO / "configs" / "tiny_serial.json"


def tiny_system(config_path=TINY_CONFIG):
    """(codec, predictor) of a configuration, seeded random weights, in eval mode."""
    config = load_config(config_path)
    seed_everything(0)
    codec = build_codec(config["codec"], config["sample_rate"]).eval()
    return codec, build_enhancer(config["enhancer"], codec).eval()

REQUIRED = ("rtf_parallel", "rtf_serial", "speedup", "rtf_bound", "params_parallel", "params_serial",
            "gflops_per_second_parallel", "gflops_per_second_serial", "matmul_gflops", "threads", "stages_parallel",
            "stages_serial", "length_scaling", "batch_throughput", "rtf_quantized", "token_agreement")


def test_benchmark_end_to_end_on_the_tiny_configuration(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PARAGSE_EXAMPLES": str(EXAMPLES)}
    done = subprocess.run([sys.executable, str(REPO / "benchmark.py"), "--config", str(TINY_CONFIG),
                           "--serial_config", str(TINY_SERIAL_CONFIG), "--lengths",
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


def test_a_serial_config_as_the_parallel_one_and_a_json_folder_are_refused_before_measuring(tmp_path, capsys):
    assert benchmark.main(["--config", str(TINY_SERIAL_CONFIG), "--skip_serial", "--lengths", "2"]) == 2
    assert "not ParaGSE" in capsys.readouterr().err
    assert benchmark.main(["--config", str(TINY_CONFIG), "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


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


def test_a_parallelized_predictor_counts_the_flops_of_the_plain_one(speech):
    """cpu_speed cuts the token branches into parts that share the weights: the benchmark's bound must count each
    group's work once, as for the plain model."""
    codec, model = tiny_system()
    padded = codec.pad(torch.from_numpy(speech[:16000])[None])

    def predict():
        return model(padded, codec.encode(padded))

    plain, plain_lstm = benchmark.counted_flops(predict, torch.get_num_threads()), benchmark.lstm_flops(model, 50, 1)
    cpu_speed.parallelize(model, threads=2)
    assert isinstance(model.token_branches, cpu_speed.ConcurrentTokenBranches)
    assert benchmark.lstm_flops(model, 50, 1) == plain_lstm > 0
    assert benchmark.counted_flops(predict, torch.get_num_threads()) == plain


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
    """inference.py runs the codec encoder and the degraded branch as two concurrent tasks, and the token groups
    as one task per thread (cpu_speed); the plain model runs everything in order on one thread. Logits and tokens
    must be identical, bit for bit; the audio too up to the decoder's sums, which 1 or 2 threads may split
    differently."""
    codec, model = tiny_system()
    _nontrivial_norms(model)
    wav = torch.from_numpy(np.stack([speech[:24000], speech[8000:32000]]))
    padded = codec.pad(wav)
    with torch.inference_mode():
        plain_logits = model(padded, codec.encode(padded))
    plain = inference.Enhancer(codec, model, torch.device("cpu"), window_seconds=60, overlap_seconds=1)

    def run():
        return plain.enhance_batch(wav)

    audio_1, tokens_1 = _with_threads(1, run)
    concurrent = inference.Enhancer(codec, model, torch.device("cpu"), window_seconds=60, overlap_seconds=1)
    _with_threads(2, concurrent.parallelize)  # one part of the groups per thread
    assert isinstance(model.token_branches, cpu_speed.ConcurrentTokenBranches)

    def run_concurrent():
        with torch.inference_mode():
            return model(padded, codec.encode(padded)), concurrent.enhance_batch(wav)

    logits_2, (audio_2, tokens_2) = _with_threads(2, run_concurrent)
    assert torch.equal(plain_logits, logits_2) and torch.equal(tokens_1, tokens_2)
    assert (audio_1 - audio_2).abs().max() < 1e-5
    assert torch.equal(tokens_1, plain_logits.argmax(-1))  # the pipeline predicts what the model's logits say


def test_bf16_predictor_runs_in_bf16_in_every_concurrent_task(speech):
    """--precision bf16 puts the token predictor under bfloat16 autocast. Autocast is per thread, so the concurrent
    path must re-enter it in each task: its logits are then those of the sequential bfloat16 path, bit for bit,
    not float32's, and its tokens are mostly float32's."""
    codec, model = tiny_system()
    _nontrivial_norms(model)
    wav = torch.from_numpy(np.stack([speech[:24000], speech[8000:32000]]))
    padded = codec.pad(wav)
    sequential = inference.Enhancer(codec, model, torch.device("cpu"), 60, 1, precision="bf16")
    fp32 = inference.Enhancer(codec, model, torch.device("cpu"), 60, 1)

    def logits(enhancer):
        degraded_tokens = codec.encode(padded)
        with enhancer.predictor_precision():
            return model.predict(model.condition(padded), degraded_tokens)

    logits_1, (_, tokens_1) = _with_threads(1, lambda: (logits(sequential), sequential.enhance_batch(wav)))
    logits_fp32, (_, tokens_fp32) = _with_threads(1, lambda: (logits(fp32), fp32.enhance_batch(wav)))
    concurrent = inference.Enhancer(codec, model, torch.device("cpu"), 60, 1, precision="bf16")
    _with_threads(2, concurrent.parallelize)
    logits_2, (_, tokens_2) = _with_threads(2, lambda: (logits(concurrent), concurrent.enhance_batch(wav)))
    assert torch.equal(logits_1, logits_2) and torch.equal(tokens_1, tokens_2)
    assert not torch.equal(logits_2, logits_fp32)
    assert (tokens_1 == tokens_fp32).float().mean() > 0.5


def _tiny_folder_job(tmp_path, speech) -> tuple[list[str], Codec]:
    """A saved tiny ParaGSE and a folder with one clip: inference.py's arguments for them on CPU, and the codec."""
    codec, model = tiny_system()
    config = load_config(TINY_CONFIG)
    checkpoint.save(tmp_path / "paragse.pt", checkpoint.enhancer_payload(model, checkpoint.codec_payload(codec),
                                                                         config["inference"]))
    save_audio(tmp_path / "in" / "clip.wav", speech[:20000], 16000)
    return ["--input_dir", str(tmp_path / "in"), "--checkpoint", str(tmp_path / "paragse.pt"), "--device", "cpu"], codec


def test_inference_precision_flag_enhances_a_folder(tmp_path, speech):
    argv = _tiny_folder_job(tmp_path, speech)[0] + ["--output_dir", str(tmp_path / "out")]
    assert inference.main(argv + ["--precision", "bf16"]) == 0
    assert load_audio(tmp_path / "out" / "clip.wav", 16000)[0].shape == (20000,)
    assert inference.main(argv) == 2  # the folder's outputs were made in bf16: not mixed without --overwrite
    assert inference.main(argv + ["--precision", "bf16", "--quantize"]) == 2


def test_serial_predict_is_its_own_argmax_chain(speech):
    """At inference each serial stage conditions on the stages before it as predicted: teacher-forcing the model
    on its own predicted tokens must give the same logits."""
    codec, model = tiny_system(TINY_SERIAL_CONFIG)
    padded = codec.pad(torch.from_numpy(speech[:16000])[None])
    with torch.inference_mode():
        tokens = codec.encode(padded)
        logits = model.predict(model.condition(padded), tokens)
        assert torch.equal(model(padded, tokens, logits.argmax(-1)), logits)


def test_quantized_grouped_modules_approximate_the_float_ones():
    seed_everything(0)
    linear, lstm = GroupedLinear(3, 16, 24), GroupedBiLSTM(3, 16, 8, 2).eval()
    x = torch.randn(3, 2, 20, 16)
    q_linear, q_lstm = QuantizedGroupedLinear(linear), QuantizedGroupedBiLSTM(lstm)
    with torch.inference_mode():
        for reference, quantized in ((linear(x), q_linear(x)), (lstm(x), q_lstm(x))):
            assert quantized.shape == reference.shape
            assert (quantized - reference).abs().max() < 0.05 * reference.abs().max()


def test_split_groups_covers_every_group_once():
    assert cpu_speed.split_groups(4, 2) == [slice(0, 2), slice(2, 4)]
    assert cpu_speed.split_groups(1, 2) == [slice(0, 1)]
    assert cpu_speed.split_groups(5, 3) == [slice(0, 2), slice(2, 3), slice(3, 5)]


def test_inference_quantize_flag_enhances_a_folder(tmp_path, speech):
    argv, codec = _tiny_folder_job(tmp_path, speech)
    argv += ["--threads", "2"]
    assert inference.main(argv + ["--output_dir", str(tmp_path / "int8"), "--quantize", "--save_tokens"]) == 0
    assert load_audio(tmp_path / "int8" / "clip.wav", 16000)[0].shape == (20000,)
    assert np.load(tmp_path / "int8" / "clip.tokens.npy").shape[0] == codec.num_groups
    assert inference.main(argv + ["--output_dir", str(tmp_path / "codec"), "--codec_only", "--quantize"]) == 2
