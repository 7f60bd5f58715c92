"""ParaGSE and the serial baseline: batched groups equal a per-group loop, training overfits, inference works."""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import cpu_speed
import inference
import train
from conftest import REPO, TINY_CONFIG, TINY_SERIAL_CONFIG, latest_checkpoint, write_config
from degradations import band_limit
from models import build_codec, build_enhancer
from models.codec import Codec
from models.conformer import ConvModule, GroupedBiLSTM, GroupedLinear
from models.input_blend import input_blend_for
from models.paragse import TokenBranches
from utils import UserError, argmax, load_audio, load_config, normalise_level, save_audio, seed_everything


def _system(config_path: Path = TINY_CONFIG, seed: int = 0) -> tuple[Codec, torch.nn.Module]:
    """(codec, predictor) of a config file, seeded random weights, in eval mode."""
    config = load_config(config_path)
    seed_everything(seed)
    codec = build_codec(config["codec"], config["sample_rate"]).eval()
    return codec, build_enhancer(config["enhancer"], codec).eval()


def test_grouped_lstm_and_linear_match_torch_modules() -> None:
    """Each group of GroupedBiLSTM / GroupedLinear computes what nn.LSTM / nn.Linear with its weights computes, in
    training and in CPU inference (where a grouped Linear runs oneDNN's product with its bias and activation fused,
    models/onednn.py), for one group and several."""
    seed_everything(0)
    lstm = GroupedBiLSTM(3, 12, 8, 2)
    x = torch.randn(3, 2, 17, 12)
    y = lstm(x)
    for g in range(3):
        reference = torch.nn.LSTM(12, 8, 2, batch_first=True, bidirectional=True)
        reference.load_state_dict({
            f"{kind}_l{layer}{suffix}": getattr(lstm, kind)[layer][g, d]
            for layer in range(2) for d, suffix in enumerate(["", "_reverse"])
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        })
        assert (reference(x[g])[0] - y[g]).abs().max() < 1e-5
    for groups in (3, 1):
        linear = GroupedLinear(groups, 12, 5)
        for activation in (None, "silu", "gelu"):
            training = linear(x[:groups], activation)
            with torch.inference_mode():
                inference = linear(x[:groups], activation)
            assert training.requires_grad and not inference.requires_grad
            for g in range(groups):
                dense = torch.nn.Linear(12, 5)
                dense.load_state_dict({"weight": linear.weight[g].t(), "bias": linear.bias[g, 0]})
                expected = {None: dense, "silu": lambda v: torch.nn.functional.silu(dense(v)),
                            "gelu": lambda v: torch.nn.functional.gelu(dense(v))}[activation](x[g])
                assert (expected - training[g]).abs().max() < 1e-5
                assert (expected - inference[g]).abs().max() < 1e-5


@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_conformer_convolution_is_the_conv1d_and_batchnorm_its_parameters_describe(dilation: int) -> None:
    """The depthwise convolution and BatchNorm, run frames-last group by group, compute what nn.Conv1d and
    nn.BatchNorm1d over groups x channels compute with the same parameters (so every checkpoint means the same),
    in evaluation and in training (batch statistics and running-statistic updates), with any dilation."""
    seed_everything(0)
    for training in (False, True):
        module = ConvModule(3, 8, 2, 7, dilation, 0.0).train(training)
        with torch.no_grad():
            module.batch_norm.running_mean.uniform_(-0.5, 0.5)
            module.batch_norm.running_var.uniform_(0.5, 2.0)
            module.batch_norm.weight.uniform_(0.5, 2.0)
            module.batch_norm.bias.uniform_(-0.5, 0.5)
        x = torch.randn(3, 2, 23, 8)  # 23 frames: not a multiple of any dilation
        reference_norm = copy.deepcopy(module.batch_norm)
        inner = torch.nn.functional.glu(module.pointwise_in(module.norm(x)), dim=-1)
        channels_first = inner.permute(1, 0, 3, 2).reshape(2, 3 * module.inner, 23)
        expected = torch.nn.functional.silu(reference_norm(module.depthwise(channels_first)))
        expected = module.pointwise_out(expected.view(2, 3, module.inner, 23).permute(1, 0, 3, 2))
        assert (module(x) - expected).abs().max() < 1e-5
        assert torch.allclose(module.batch_norm.running_mean, reference_norm.running_mean, atol=1e-6)
        assert torch.allclose(module.batch_norm.running_var, reference_norm.running_var, atol=1e-6)


def _token_branches(groups: int, codes: int, copy_prior: dict | None = None,
                    group_codes: torch.Tensor | None = None) -> TokenBranches:
    """The tiny config's token branches, with non-trivial BatchNorm statistics (and copy-prior gate) so that
    comparisons mean something."""
    config = load_config(TINY_CONFIG)["enhancer"]
    seed_everything(1)
    branches = TokenBranches(groups, codes, conformer=config["conformer"], **config["token_branch"] |
                             {"copy_prior": copy_prior, "group_codes": group_codes}).eval()
    for module in branches.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    if branches.copy_prior is not None:
        branches.copy_prior.gate.weight.data.normal_(0, 0.01)
    return branches


@pytest.mark.parametrize("copy_prior", [None, {"initial_log_strength": 0.0, "log_strength_scale": 8.0}])
def test_batched_group_branches_equal_a_loop_over_groups(copy_prior: dict | None) -> None:
    """Group g of the batched token branches computes exactly what a one-group module with group g's weights (copied
    out by hand) computes; `select` gives the same slices, sharing the weights. With the copy prior too."""
    groups, codes = 4, 64
    group_codes = torch.randn(groups, codes, 3, generator=torch.Generator().manual_seed(2))
    batched = _token_branches(groups, codes, copy_prior, group_codes if copy_prior else None)
    condition = torch.randn(2, 30, batched.fuse.weight.shape[-1])
    tokens = torch.randint(0, codes, (2, groups, 30))
    with torch.inference_mode():
        logits = batched(condition, tokens)
        for g in range(groups):
            single = _token_branches(1, codes, copy_prior, group_codes[g: g + 1] if copy_prior else None)
            state = {}
            for name, value in batched.state_dict().items():
                size = single.state_dict()[name].shape[0] if value.dim() else 0
                # Group-major rows: stacked weights, the embedding table, depthwise convolution and BatchNorm.
                state[name] = value[g * size: (g + 1) * size] if size and value.shape[0] == groups * size else value
            single.load_state_dict(state)
            reference = single(condition, tokens[:, g: g + 1])
            assert (reference[:, 0] - logits[:, g]).abs().max() < 1e-5
            assert torch.equal(batched.select(slice(g, g + 1))(condition, tokens[:, g: g + 1]), reference)
        assert torch.equal(batched.select(slice(1, 3))(condition, tokens[:, 1:3]), logits[:, 1:3])
    assert batched.select(slice(0, 1)).logits.weight.data_ptr() == batched.logits.weight.data_ptr()


def test_the_predictor_in_cpu_inference_gives_the_logits_of_its_training_path(speech: np.ndarray) -> None:
    """Without autograd on a CPU the grouped Linears run as fused oneDNN products (models/onednn.py); the logits are
    those of the layer-by-layer path that training runs, within float rounding."""
    codec, model = _system()
    padded = codec.pad(torch.from_numpy(speech[:16000])[None])
    with torch.inference_mode():
        tokens = codec.encode(padded)
        fused = model(padded, tokens)
    layer_by_layer = model(padded, tokens.clone())
    assert layer_by_layer.requires_grad
    assert (fused - layer_by_layer.detach()).abs().max() < 1e-5 * layer_by_layer.abs().max()


@pytest.mark.parametrize("threads", [2, 3])
def test_token_parallel_predictor_gives_bit_identical_logits(speech: np.ndarray, threads: int) -> None:
    """cpu_speed.parallelize cuts the token branches into parts run as concurrent tasks: the logits stay the same
    bit for bit (parts of unequal size included)."""
    codec, model = _system()
    padded = codec.pad(torch.from_numpy(speech[:16000])[None])
    with torch.inference_mode():
        tokens = codec.encode(padded)
        plain = model(padded, tokens)
        cpu_speed.parallelize(model, threads)
        assert isinstance(model.token_branches, cpu_speed.ConcurrentTokenBranches)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert torch.equal(model(padded, tokens), plain)
        finally:
            torch.set_num_threads(previous)


def test_the_fast_token_argmax_picks_what_torch_argmax_picks() -> None:
    """utils.argmax (tokens from logits, VQ look-ups) returns torch's indices: the first maximum on ties, NaN as the
    maximum, any codebook size."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 50, 1024, generator=generator)
    ties = torch.randint(0, 3, (3, 50, 256), generator=generator).float()  # many equal maxima per row
    with_nan = torch.randn(6, 1024, generator=generator)
    with_nan[0, 700], with_nan[1, 5], with_nan[1, 900], with_nan[2] = float("nan"), float("nan"), float("nan"), -1.0
    odd = torch.randn(5, 1000, generator=generator)  # not a whole number of blocks
    for values in (logits, ties, with_nan, odd, logits.transpose(1, 2)):
        assert torch.equal(argmax(values), values.argmax(dim=-1))


def _write_pair(folder: Path, speech: np.ndarray, seconds: float = 2.0, snr_db: float = 5.0) -> tuple[Path, Path]:
    """A noisy/clean pair of folders holding one clip at `snr_db`."""
    clean = speech[: int(seconds * 16000)]
    noise = np.random.default_rng(0).standard_normal(clean.shape[0]).astype(np.float32)
    noise *= np.sqrt(np.mean(clean**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    save_audio(folder / "clean" / "pair.wav", clean, 16000)
    save_audio(folder / "noisy" / "pair.wav", clean + noise, 16000)
    return folder / "noisy", folder / "clean"


def _one_pair_config(tmp_path: Path, base: Path) -> tuple[Path, Path]:
    """`base` training on one fixed pair, and a random-weight codec checkpoint of its codec section."""
    # Longer than the 2 s clip: every draw is the whole pair (zero-padded), one fixed pair to memorise.
    path = write_config(tmp_path / f"one_pair_{base.stem}.json",
                        {"base": base.name, "enhancer_training": {"segment_length": 32280, "batch_size": 1}})
    codec, _ = _system(path)
    checkpoint.save(tmp_path / f"codec_{base.stem}.pt", checkpoint.codec_payload(codec))
    return path, tmp_path / f"codec_{base.stem}.pt"


def _accuracy(path: Path, noisy_dir: Path, clean_dir: Path) -> tuple[float, float]:
    """(token accuracy of the enhancer's prediction, of copying the degraded tokens) on the pair, both brought to
    the model's input level as training and inference do."""
    model, codec, defaults = checkpoint.load_enhancer(path)
    degraded = torch.from_numpy(load_audio(noisy_dir / "pair.wav", 16000)[0])[None]
    clean = torch.from_numpy(load_audio(clean_dir / "pair.wav", 16000)[0])[None]
    degraded, gain = normalise_level(degraded, defaults["input_level_db"], 16000)
    clean = (clean - clean.mean()) * gain
    with torch.inference_mode():
        degraded_tokens, clean_tokens = codec.encode(degraded), codec.encode(clean)
        predicted = model.predict(model.condition(codec.pad(degraded)), degraded_tokens).argmax(-1)
    return (predicted == clean_tokens).float().mean().item(), (degraded_tokens == clean_tokens).float().mean().item()


@pytest.mark.parametrize("stage, base", [("enhancer", TINY_CONFIG), ("serial", TINY_SERIAL_CONFIG)])
def test_tiny_model_overfits_a_real_pair_and_enhances_a_folder(tmp_path: Path, speech: np.ndarray, stage: str,
                                                               base: Path) -> None:
    """100 steps on one noisy/clean pair: the predicted tokens are the clean ones (far above copying the noisy
    tokens), and inference.py enhances the folder to the input's length with the tokens saved."""
    noisy_dir, clean_dir = _write_pair(tmp_path, speech)
    config, codec = _one_pair_config(tmp_path, base)
    argv = ["--stage", stage, "--config", str(config), "--codec", str(codec), "--checkpoint_dir",
            str(tmp_path / "run"), "--train_degraded_dir", str(noisy_dir), "--train_clean_dir", str(clean_dir),
            "--device", "cpu"]
    assert train.main(argv + ["--max_steps", "0"]) == 0
    accuracy_before, copy_before = _accuracy(latest_checkpoint(tmp_path / "run"), noisy_dir, clean_dir)
    assert train.main(argv + ["--max_steps", "100"]) == 0
    last = latest_checkpoint(tmp_path / "run")
    accuracy, copy_accuracy = _accuracy(last, noisy_dir, clean_dir)
    assert accuracy > 0.9, f"token accuracy {accuracy_before:.3f} -> {accuracy:.3f}"
    assert copy_accuracy == copy_before < 0.9  # the copy baseline is a property of the data, not the model

    out = tmp_path / "enhanced"
    assert inference.main(["--input_dir", str(noisy_dir), "--output_dir", str(out), "--checkpoint", str(last),
                           "--device", "cpu", "--save_tokens"]) == 0
    enhanced, notes = load_audio(out / "pair.wav", 16000)
    assert enhanced.shape[0] == load_audio(noisy_dir / "pair.wav", 16000)[0].shape[0] and not notes
    assert np.load(out / "pair.tokens.npy").shape[0] == 4


def test_windowed_enhancement_matches_whole_file_and_keeps_length(speech: np.ndarray) -> None:
    """A clip shorter than a window is enhanced exactly as a whole; a long one keeps its length and token count."""
    codec, model = _system()
    whole = inference.Enhancer(codec, model, torch.device("cpu"), window_seconds=60, overlap_seconds=1)
    windowed = inference.Enhancer(codec, model, torch.device("cpu"), window_seconds=1.0, overlap_seconds=0.2,
                                  batch_size=3)
    short = speech[:11111]
    assert np.array_equal(windowed.enhance(short).audio, whole.enhance(short).audio)  # shorter than a window: as whole
    long = np.tile(speech, 3)[: 16000 * 7 + 123]
    result = windowed.enhance(long)
    assert result.audio.shape == long.shape
    assert np.isfinite(result.audio).all()
    assert result.tokens.shape == whole.enhance(long).tokens.shape


def test_expected_decoding_sharpens_into_argmax_decoding_and_needs_parallel_groups(speech: np.ndarray) -> None:
    """Decoding by expectation at a tiny temperature is arg-max decoding; at T 1 it differs; a temperature of 0 and
    the serial baseline (dependent stages) are refused."""
    codec, model = _system()
    clip = speech[:16000]

    def enhance(**decoding: float | str) -> inference.Result:
        return inference.Enhancer(codec, model, torch.device("cpu"), 60, 1, **decoding).enhance(clip)

    # 1e-7: even two logits 1e-4 apart (a near tie happens among thousands of frames x groups) give one-hot weights
    argmax, sharp, soft = enhance(), enhance(decoding="expected", temperature=1e-7), enhance(decoding="expected")
    assert np.array_equal(sharp.tokens, argmax.tokens) and np.array_equal(soft.tokens, argmax.tokens)
    assert np.allclose(sharp.audio, argmax.audio, atol=1e-4)  # a near one-hot distribution is its arg-max
    assert not np.allclose(soft.audio, argmax.audio, atol=1e-3)
    with pytest.raises(UserError, match="inference.temperature"):
        enhance(decoding="expected", temperature=0.0)

    rvq_codec, serial = _system(TINY_SERIAL_CONFIG)
    with pytest.raises(UserError, match="serial baseline"):
        inference.Enhancer(rvq_codec, serial, torch.device("cpu"), 60, 1, decoding="expected")


def test_the_copy_prior_starts_nearly_shut_on_a_trained_model_and_copies_when_open(speech: np.ndarray) -> None:
    """token_branch.copy_prior added to a trained predictor (checkpoint.load_weights(grown=True), as --init_from does)
    changes its logits by little until it learns to open; wide open, the prediction is the degraded tokens."""
    config = load_config(TINY_CONFIG)
    codec, plain = _system()
    section = copy.deepcopy(config["enhancer"])
    section["token_branch"]["copy_prior"] = {"initial_log_strength": -4.0, "log_strength_scale": 8.0}
    grown = build_enhancer(section, codec).eval()
    fresh = checkpoint.load_weights(grown, {"model": plain.state_dict()}, "plain model", grown=True)
    assert fresh == ["token_branches.copy_prior.gate"]
    with pytest.raises(UserError, match="missing"):  # anything else missing is still refused
        checkpoint.load_weights(grown, {"model": plain.state_dict()}, "plain model")
    padded = codec.pad(torch.from_numpy(speech[:16000])[None])
    with torch.inference_mode():
        degraded_tokens = codec.encode(padded)
        before, after = plain(padded, degraded_tokens), grown(padded, degraded_tokens)
        assert 0 < (before - after).abs().max() < 0.1
        torch.nn.init.constant_(grown.token_branches.copy_prior.gate.bias, 1.5)  # strength e^12
        assert torch.equal(grown(padded, degraded_tokens).argmax(-1), degraded_tokens)


def test_a_trained_predictor_grows_the_token_branches_conformer_blocks_and_lstm_layers() -> None:
    """--init_from a model with fewer token-branch layers than the config asks for: the trained weights load, the added
    conformer block and BiLSTM layer start from their initialisation, and nothing else may be missing."""
    config = load_config(TINY_CONFIG)
    codec, plain = _system()
    section = copy.deepcopy(config["enhancer"])
    layers, blocks = section["token_branch"]["lstm_layers"], section["token_branch"]["conformer_blocks"]
    section["token_branch"].update(lstm_layers=layers + 1, conformer_blocks=blocks + 1)
    grown = build_enhancer(section, codec).eval()
    fresh = checkpoint.load_weights(grown, {"model": plain.state_dict()}, "plain model", grown=True)
    assert f"token_branches.conformers.{blocks}.ff1.expand" in fresh
    assert {"token_branches.lstm.weight_ih", "token_branches.lstm.weight_hh"} <= set(fresh)
    trained = plain.state_dict()
    assert all(torch.equal(value, trained[key]) for key, value in grown.state_dict().items() if key in trained)
    with pytest.raises(UserError, match="missing"):
        checkpoint.load_weights(grown, {"model": plain.state_dict()}, "plain model")
    incomplete = {k: v for k, v in plain.state_dict().items() if not k.startswith("token_branches.lstm.weight_hh.0")}
    with pytest.raises(UserError, match="missing"):  # a trained part missing is refused even when growing
        checkpoint.load_weights(grown, {"model": incomplete}, "plain model", grown=True)


def _band_energy(wav: np.ndarray, low_hz: float, high_hz: float) -> float:
    spectrum = np.abs(np.fft.rfft(wav)) ** 2
    hz = np.fft.rfftfreq(wav.shape[-1], 1 / 16000)
    return float(spectrum[(hz >= low_hz) & (hz < high_hz)].sum())


def test_the_input_blend_keeps_what_the_prediction_calls_intact_and_fills_what_is_missing(speech: np.ndarray) -> None:
    """With the demo codec's log-mel: a prediction equal to the input's own log-mel gives the input back exactly; a
    band-limited input gets its missing band from the generated speech and keeps its own below the limit; a noisy
    input is brought down to the predicted level, nearer the clean speech than it was, unless the model gives the
    input's own tokens all its probability (then it is kept as it is)."""
    codec = checkpoint.load_codec(REPO / "pretrained" / "demo_codec.pt")
    blend = input_blend_for(codec, smoothing_frames=16, fill_tolerance=3.0)
    clean = codec.pad(torch.from_numpy(speech)[None])
    predicted = codec.log_mel(clean)  # what a perfect predictor gives: the clean speech's log-mel
    doubt = torch.zeros(codec.encode(clean).shape)  # (batch, groups, frames): no degraded token called intact
    with torch.inference_mode():
        unrelated = torch.from_numpy(np.random.default_rng(0).normal(0, 0.05, clean.shape).astype(np.float32))
        # up to the rounding of the STFT's round trip: no band falls short of the prediction, so nothing is filled
        assert (blend(clean, predicted, doubt, unrelated) - clean).pow(2).mean() < 1e-6 * clean.pow(2).mean()

        spectrum = torch.fft.rfft(clean)
        spectrum[..., round(4000 / 8000 * (spectrum.shape[-1] - 1)):] = 0  # band-limited to 4 kHz
        band_limited = torch.fft.irfft(spectrum, clean.shape[-1])
        out = blend(band_limited, predicted, doubt, clean)[0].numpy()  # the codec's speech stood in by the clean
        reference, low = clean[0].numpy(), band_limited[0].numpy()
        assert _band_energy(low, 4500, 8000) < 1e-6 * _band_energy(reference, 4500, 8000)
        assert _band_energy(out, 4500, 8000) == pytest.approx(_band_energy(reference, 4500, 8000), rel=0.2)
        assert np.corrcoef(out, reference)[0, 1] > 0.99

        noise = torch.from_numpy(np.random.default_rng(1).normal(0, 1, clean.shape).astype(np.float32))
        noisy = clean + noise * clean.std() / noise.std()  # 0 dB
        out = blend(noisy, predicted, doubt, torch.zeros_like(clean))
        assert (out - clean).pow(2).mean() < 0.5 * (noisy - clean).pow(2).mean()
        trusted = blend(noisy, predicted, torch.ones_like(doubt), torch.zeros_like(clean))
        assert (trusted - noisy).pow(2).mean() < 1e-6 * noisy.pow(2).mean()

    with pytest.raises(UserError, match="decodes to a log-mel"):
        input_blend_for(_system()[0], smoothing_frames=16, fill_tolerance=3.0)  # the tiny config's MDCT codec


def test_a_band_limited_recording_keeps_its_own_band_below_the_limit(speech: np.ndarray) -> None:
    """A telephone-band recording (resampled to 8 kHz and back) comes through below its limit as it is, even where
    the prediction there falls short of it (the model's error), and gets the band above from the generated speech;
    without the band-limit rule the same prediction would have pulled the low band down. A full-band recording,
    and one that was noisy before it was band-limited, are blended exactly as without the rule."""
    codec = checkpoint.load_codec(REPO / "pretrained" / "demo_codec.pt")
    plain = input_blend_for(codec, smoothing_frames=16, fill_tolerance=3.0)
    rule = input_blend_for(codec, smoothing_frames=16, fill_tolerance=3.0, band_limit_depth_db=60.0,
                           band_limit_max_hz=6000.0, band_limit_clean_db=(20.0, 35.0))
    clean = codec.pad(torch.from_numpy(speech)[None])
    band_limited = torch.from_numpy(band_limit(clean[0].numpy(), 8000, 16000))[None]
    short = codec.log_mel(clean) - math.log(2.0)  # every band predicted at half its magnitude
    doubt = torch.zeros(codec.encode(clean).shape)
    with torch.inference_mode():
        out = rule(band_limited, short, doubt, clean)[0].numpy()  # the codec's speech stood in by the clean
        pulled_down = plain(band_limited, short, doubt, clean)[0].numpy()
        low, reference = band_limited[0].numpy(), clean[0].numpy()
        assert _band_energy(out - low, 0, 3500) < 1e-4 * _band_energy(low, 0, 3500)
        assert _band_energy(pulled_down - low, 0, 3500) > 0.1 * _band_energy(low, 0, 3500)
        assert _band_energy(low, 4500, 8000) < 1e-6 * _band_energy(reference, 4500, 8000)
        assert _band_energy(out, 4500, 8000) > 0.1 * _band_energy(reference, 4500, 8000)

        noise = torch.from_numpy(np.random.default_rng(1).normal(0, 1, clean.shape).astype(np.float32))
        noisy = clean + noise * clean.std() / noise.std()  # 0 dB
        assert torch.equal(rule(noisy, short, doubt, clean), plain(noisy, short, doubt, clean))
        noisy_band_limited = torch.from_numpy(band_limit(noisy[0].numpy(), 8000, 16000))[None]
        assert rule.bands_below_limit(rule.analyse(noisy_band_limited)[0]).item() > 0  # the limit is found
        assert torch.equal(rule(noisy_band_limited, short, doubt, clean),
                           plain(noisy_band_limited, short, doubt, clean))  # but the noise is not kept
    with pytest.raises(UserError, match="all three given or none"):
        input_blend_for(codec, smoothing_frames=16, fill_tolerance=3.0, band_limit_depth_db=60.0)


def test_the_blend_keeps_a_clean_recording_nearer_than_the_codec_alone_and_can_be_turned_off(
        tmp_path: Path, speech: np.ndarray) -> None:
    """The demo model with inference.blend gives a clean recording back closer (ESTOI) than its re-synthesis;
    `checkpoint.py export --blend` sets it, `inference.py --no_blend` skips it and the output folder records which."""
    from pystoi import stoi
    enhancer_path = tmp_path / "blend.pt"
    checkpoint.main(["export", str(REPO / "pretrained" / "demo_paragse.pt"), str(enhancer_path),
                     "--name_codec", str(REPO / "pretrained" / "demo_codec.pt"), "--blend", checkpoint.BLEND_EXAMPLE])
    (tmp_path / "demo_codec.pt").symlink_to(REPO / "pretrained" / "demo_codec.pt")
    blended = inference.Enhancer.load(enhancer_path, "cpu")
    alone = inference.Enhancer.load(enhancer_path, "cpu", blend=False)
    assert blended.blend is not None and alone.blend is None
    clip = speech[:48000]
    near, far = (stoi(clip, e.enhance(clip).audio, 16000, extended=True) for e in (blended, alone))
    assert near > far + 0.01 and near > 0.93

    save_audio(tmp_path / "in" / "a.wav", clip, 16000)
    argv = ["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
            "--checkpoint", str(enhancer_path)]
    assert inference.main(argv + ["--no_blend"]) == 0
    assert json.loads((tmp_path / "out" / inference.SETTINGS_FILE).read_text())["blend"] is False
    assert inference.main(argv) == 2  # the folder holds re-synthesis: blending into it is refused
    with pytest.raises(UserError, match="inference.blend: smoothing_frames must be an integer of 1 or more, not 0"):
        checkpoint.export(enhancer_path, tmp_path / "bad.pt", blend='{"smoothing_frames": 0, "fill_tolerance": 3.0}')
    with pytest.raises(UserError, match="inference.blend must be null or like"):
        checkpoint.export(enhancer_path, tmp_path / "bad.pt", blend='{"smoothing_frames": 16}')


def test_a_long_recording_stays_within_memory_at_paper_configuration(tmp_path: Path, speech: np.ndarray) -> None:
    """Paper-size ParaGSE (random weights) in 20 s windows: a recording five times longer raises the peak memory by
    no more than its own samples need, and comes out at its exact length."""
    script = """
import resource, sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(2)
from inference import Enhancer
from models import build_codec, build_enhancer
from utils import load_config, seed_everything
config = load_config()
seed_everything(0)
codec = build_codec(config["codec"], config["sample_rate"])
enhancer = Enhancer(codec, build_enhancer(config["enhancer"], codec), torch.device("cpu"),
                    config["inference"]["window_seconds"], config["inference"]["overlap_seconds"])
speech = np.load(sys.argv[2])
for seconds in (25, 125):
    audio = np.tile(speech, seconds * 16000 // len(speech) + 1)[: seconds * 16000 + 77]
    out = enhancer.enhance(audio).audio
    print(out.shape[0], audio.shape[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    np.save(tmp_path / "speech.npy", speech)
    result = subprocess.run([sys.executable, "-c", script, str(REPO), str(tmp_path / "speech.npy")],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    (short_out, short_in, short_peak), (long_out, long_in, long_peak) = (line.split() for line in
                                                                         result.stdout.split("\n")[:2])
    assert short_out == short_in and long_out == long_in
    # 100 s more audio: a few float32 copies of it (input, output, weights of the cross-fade) = 6.4 MB each.
    assert float(long_peak) - float(short_peak) < 100, f"peak RSS {short_peak} MB -> {long_peak} MB"
    assert float(long_peak) < 2500, f"peak RSS {long_peak} MB"


def test_init_from_carries_trained_weights_onto_a_new_codec(tmp_path: Path, speech: np.ndarray,
                                                            capsys: pytest.CaptureFixture) -> None:
    """--init_from starts a new run (step 0) from an enhancer's weights on the codec given by --codec (without it,
    on the codec of those weights, found beside an export that names it); its compute time carries on; a checkpoint
    of another kind is refused by name."""
    noisy_dir, clean_dir = _write_pair(tmp_path, speech)
    config, codec = _one_pair_config(tmp_path, TINY_CONFIG)
    common = ["--stage", "enhancer", "--config", str(config), "--train_degraded_dir", str(noisy_dir),
              "--train_clean_dir", str(clean_dir), "--device", "cpu"]
    assert train.main(common + ["--codec", str(codec), "--checkpoint_dir", str(tmp_path / "a"),
                                "--max_steps", "3"]) == 0
    trained = latest_checkpoint(tmp_path / "a")
    retrained_codec, _ = _system(config, seed=1)
    checkpoint.save(tmp_path / "codec_b.pt", checkpoint.codec_payload(retrained_codec))
    assert train.main(common + ["--codec", str(tmp_path / "codec_b.pt"), "--checkpoint_dir", str(tmp_path / "b"),
                                "--init_from", str(trained), "--max_steps", "0"]) == 0
    model_a, _, _ = checkpoint.load_enhancer(trained)
    model_b, codec_b, _ = checkpoint.load_enhancer(tmp_path / "b" / "checkpoint_00000000.pt")
    assert all(torch.equal(v, model_b.state_dict()[k]) for k, v in model_a.state_dict().items())
    assert all(torch.equal(v, codec_b.state_dict()[k]) for k, v in retrained_codec.state_dict().items())
    started = checkpoint.load(tmp_path / "b" / "checkpoint_00000000.pt")["training"]
    assert started["step"] == 0  # a new run, whose compute time carries on from the weights it started from
    assert started["compute_seconds"] >= checkpoint.load(trained)["training"]["compute_seconds"] > 0

    # Without --codec the run takes the codec of the weights it starts from, also one that an export names.
    exported = tmp_path / "exported" / "enhancer.pt"
    assert checkpoint.main(["export", str(trained), str(exported), "--name_codec", str(codec)]) == 0
    assert train.main(common + ["--checkpoint_dir", str(tmp_path / "d"), "--init_from", str(exported),
                                "--max_steps", "0"]) == 0
    _, codec_d, _ = checkpoint.load_enhancer(tmp_path / "d" / "checkpoint_00000000.pt")
    original = checkpoint.load_codec(codec)
    assert all(torch.equal(v, codec_d.state_dict()[k]) for k, v in original.state_dict().items())

    wrong = common + ["--codec", str(codec), "--checkpoint_dir", str(tmp_path / "c"), "--init_from", str(codec)]
    assert train.main(wrong) == 2
    assert "codec_tiny.pt" in capsys.readouterr().err


def test_shipped_demo_model_is_one_enhancer_that_names_its_codec_within_25_mb(speech: np.ndarray) -> None:
    """The demo pair a fresh clone runs: the enhancer names the codec file beside it (not a copy), the two load
    safely, together at most 25 MB, and the enhancer predicts every group of the codec's tokens."""
    enhancer_path, codec_path = REPO / "pretrained" / "demo_paragse.pt", REPO / "pretrained" / "demo_codec.pt"
    assert enhancer_path.stat().st_size + codec_path.stat().st_size <= 25_000_000
    reference = checkpoint.load(enhancer_path, "enhancer")["codec"]
    assert reference["kind"] == "codec_reference" and reference["file"] == codec_path.name
    predictor, codec, _ = checkpoint.load_enhancer(enhancer_path)
    shipped_codec = checkpoint.load_codec(codec_path)
    padded = codec.pad(torch.from_numpy(speech)[None])
    with torch.inference_mode():
        degraded_tokens = codec.encode(padded)
        assert torch.equal(degraded_tokens, shipped_codec.encode(padded))
        logits = predictor.predict(predictor.condition(padded), degraded_tokens)
    assert degraded_tokens.shape[1] == codec.num_groups
    assert logits.shape == (*degraded_tokens.shape, codec.codebook_size)


def test_a_loss_on_the_expected_codebook_vectors_trains_beside_the_cross_entropy(tmp_path: Path,
                                                                                  speech: np.ndarray) -> None:
    """enhancer_training.expected_latent_weight adds the distance between the codebook vectors expected under the
    predicted distributions and the clean tokens' (what decoding by expectation decodes): it is logged and falls
    as the model fits one pair; the serial baseline, whose stages are not independent, refuses it."""
    noisy_dir, clean_dir = _write_pair(tmp_path, speech)
    config, codec = _one_pair_config(tmp_path, TINY_CONFIG)
    with_loss = write_config(tmp_path / "expected.json", json.loads(config.read_text()) | {
        "enhancer_training": json.loads(config.read_text())["enhancer_training"] | {"expected_latent_weight": 1.0}})
    argv = ["--stage", "enhancer", "--config", str(with_loss), "--codec", str(codec), "--checkpoint_dir",
            str(tmp_path / "run"), "--train_degraded_dir", str(noisy_dir), "--train_clean_dir", str(clean_dir),
            "--device", "cpu", "--max_steps", "60"]
    assert train.main(argv) == 0
    points = [row for row in csv.DictReader(open(tmp_path / "run" / "log.csv")) if row["key"] == "train/latent_mse"]
    assert len(points) >= 2 and float(points[-1]["value"]) < 0.5 * float(points[0]["value"])

    serial, serial_codec = _one_pair_config(tmp_path, TINY_SERIAL_CONFIG)
    refused = write_config(tmp_path / "serial_expected.json", json.loads(serial.read_text()) | {
        "enhancer_training": json.loads(serial.read_text())["enhancer_training"] | {"expected_latent_weight": 1.0}})
    assert train.main(["--stage", "serial", "--config", str(refused), "--codec", str(serial_codec), "--checkpoint_dir",
                       str(tmp_path / "serial"), "--train_degraded_dir", str(noisy_dir), "--train_clean_dir",
                       str(clean_dir), "--device", "cpu", "--max_steps", "1"]) == 2
