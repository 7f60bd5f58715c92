"""The codecs: perfect MDCT reconstruction, token shapes, group independence, training, resuming and persistence."""
from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import train
from conftest import (DEMO_CODEC_CONFIG, REPO, TINY_CONFIG, example_clips, latest_checkpoint, tiny_mel_config,
                      train_codec, write_config)
from models import build_codec
from models.codec import Codec
from models.griffin_lim import MelGriffinLim
from models.log_mel import LogMel
from models.mdct import MDCT, bin_correlation
from utils import UserError, load_audio, load_config, seed_everything, stft


def _codec(config_path: Path | None, seed: int = 0) -> Codec:
    """A fresh codec (random weights) from a config file's codec section (None: config.json, the paper codec)."""
    seed_everything(seed)
    config = load_config(config_path)
    return build_codec(config["codec"], config["sample_rate"]).eval()


def _started_mel_codec(config_path: Path, speech: np.ndarray) -> Codec:
    """A MelCodec after its data-dependent start (statistics and k-means codebooks) on token-aligned pieces of
    `speech`."""
    codec = _codec(config_path)
    piece = codec.padded_length(8000)
    segments = torch.from_numpy(speech[: len(speech) // piece * piece]).view(-1, piece)
    codec.initialise(segments, kmeans_iterations=5, seed=0)
    return codec


def _log_rows(path: Path) -> list[tuple[int, float, str, float]]:
    """log.csv as (step, compute_hours, key, value) rows."""
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["compute_hours"]), r["key"], float(r["value"])) for r in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------------------ MDCT
def test_mdct_reconstructs_real_speech_exactly(speech: np.ndarray, other_speech: np.ndarray) -> None:
    """The MDCT and its inverse give back the waveform to float precision, for any length and batches."""
    mdct = MDCT(80, 40)
    x = torch.from_numpy(speech)
    assert (mdct.inverse(mdct(x), x.shape[0]) - x).abs().max() < 1e-5
    length = min(len(speech), len(other_speech)) - 7  # not a multiple of the hop
    batch = torch.stack([torch.from_numpy(speech[:length]), torch.from_numpy(other_speech[:length])])
    assert (mdct.inverse(mdct(batch), length) - batch).abs().max() < 1e-5
    # Under mixed-precision training (bfloat16 autocast) the transform itself stays exact.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (mdct.inverse(mdct(x), x.shape[0]) - x).abs().max() < 1e-5


def test_mdct_correlation_measures_phase_not_magnitude() -> None:
    """bin_correlation is 1 for the same coefficients at any level, -1 for flipped ones, ~0 for random signs."""
    clips = [load_audio(path, 16000)[0] for path in example_clips()]
    length = min(len(c) for c in clips)
    mdct = MDCT(80, 40)(torch.from_numpy(np.stack([c[:length] for c in clips])))  # 5 clips pooled
    random_signs = torch.where(torch.rand(mdct.shape, generator=torch.Generator().manual_seed(0)) < 0.5, -1.0, 1.0)
    assert torch.allclose(bin_correlation(mdct, 0.3 * mdct), torch.ones(40), atol=1e-5)  # level does not matter
    assert torch.allclose(bin_correlation(mdct, -mdct), -torch.ones(40), atol=1e-5)
    # Exact magnitudes with the wrong phase: near 0 (single bins scatter, since a few transients can hold much
    # of a bin's energy).
    wrong_phase = bin_correlation(mdct, mdct.abs() * random_signs)
    assert wrong_phase.mean().abs() < 0.05 and wrong_phase[:5].mean().abs() < 0.1, wrong_phase


# ------------------------------------------------------------------------------------------- shapes, tokens
@pytest.mark.parametrize("config_path, groups, codes", [(None, 4, 256), (DEMO_CODEC_CONFIG, 16, 1024)],
                         ids=["paper_MDCTCodec", "demo_MelCodec"])
def test_codec_token_shapes_and_any_length(speech: np.ndarray, config_path: Path | None, groups: int,
                                           codes: int) -> None:
    """Both shipped codec classes: 50 Hz tokens (batch, groups, frames) in range, and decode gives back any length."""
    codec = _codec(config_path)
    wav = torch.from_numpy(speech[:31960])[None]
    with torch.inference_mode():
        tokens = codec.encode(wav)
        assert tokens.shape == (1, groups, 100)
        assert tokens.dtype == torch.int64 and tokens.min() >= 0 and tokens.max() < codes
        assert codec.decode(tokens, 31960).shape == (1, 31960)
        assert codec.decode(tokens).shape == (1, 31960)  # token-aligned lengths need no hint
        for length in (1, 333, 12345):
            out = codec.decode(codec.encode(wav[:, :length]), length)
            assert out.shape == (1, length)


def test_changing_one_latent_group_of_the_mdct_codec_changes_only_its_token_group(speech: np.ndarray) -> None:
    """Group VQ: token group n depends only on latent group n (what lets ParaGSE predict the groups in parallel)."""
    codec = _codec(None)
    with torch.inference_mode():
        latent = codec.encoder(codec.mdct(codec.pad(torch.from_numpy(speech[:31960])[None])))
        base = codec.quantizer(latent).tokens
        width = latent.shape[1] // codec.num_groups
        for group in range(codec.num_groups):
            changed = latent.clone()
            changed[:, group * width: (group + 1) * width] = torch.randn_like(changed[:, :width])
            tokens = codec.quantizer(changed).tokens
            for stream in range(codec.num_groups):
                same = torch.equal(tokens[:, stream], base[:, stream])
                assert same == (stream != group), f"group {group} perturbed, stream {stream} same={same}"


def test_inference_decodes_as_training_computes_and_a_batch_as_its_items(speech: np.ndarray,
                                                                          other_speech: np.ndarray) -> None:
    """On CPU inference runs each ConvNeXt bottleneck as fused oneDNN calls (GRN folded into the projection); the
    audio must be what the layer-by-layer arithmetic of training gives, and each item of a batch its own."""
    codec = _codec(None)
    length = 31960
    wav = torch.from_numpy(np.stack([speech[:length], other_speech[:length]]))
    with torch.no_grad():
        tokens = codec.encode(wav)
        decoded = codec.decode_latent(codec.quantizer.decode(tokens))
        one = codec.decode_latent(codec.quantizer.decode(tokens[1:]))
    with torch.enable_grad():  # the training path: every layer on its own
        reference = codec.decode_latent(codec.quantizer.decode(tokens)).detach()
    scale = reference.abs().max()
    assert (decoded - reference).abs().max() <= 1e-5 * scale
    assert (one[0] - reference[1]).abs().max() <= 1e-5 * scale


def test_changing_one_band_group_of_the_mel_codec_changes_only_its_token_group(tmp_path: Path,
                                                                                speech: np.ndarray) -> None:
    """Split VQ: token group n reads only mel bands of group n (adjacent bands, low to high)."""
    codec = _started_mel_codec(tiny_mel_config(tmp_path), speech)
    with torch.inference_mode():
        latent = codec.latent(codec.pad(torch.from_numpy(speech)[None]))
        base = codec.quantizer.encode(latent)
        assert torch.equal(base, codec.encode(torch.from_numpy(speech)[None]))
        width = latent.shape[1] // codec.num_groups
        for group in range(codec.num_groups):
            changed = latent.clone()
            changed[:, group * width: (group + 1) * width] += 3.0  # three standard deviations louder
            differs = (codec.quantizer.encode(changed) != base).flatten(2).any(-1)[0]
            assert differs.tolist() == [stream == group for stream in range(codec.num_groups)], group


def test_tokenizer_digest_ignores_the_decoder_and_follows_the_codebooks(tmp_path: Path, speech: np.ndarray) -> None:
    """Two codecs that differ only in decoder weights share a digest (an enhancer may take either); a changed
    codebook changes it."""
    codecs = {"MDCTCodec": (_codec(TINY_CONFIG), "quantizer.quantizers.1.codebook.weight"),
              "MelCodec": (_started_mel_codec(tiny_mel_config(tmp_path), speech), "quantizer.codebooks")}
    for name, (codec, codebook) in codecs.items():
        payload = checkpoint.codec_payload(codec)
        redecoded = payload | {"model": {k: v + 0.01 if k.startswith("decoder.") and v.is_floating_point() else v
                                         for k, v in payload["model"].items()}}
        assert any(not torch.equal(v, redecoded["model"][k]) for k, v in payload["model"].items())
        assert checkpoint.tokenizer_digest(redecoded) == checkpoint.tokenizer_digest(payload), name
        recoded = payload | {"model": payload["model"] | {codebook: payload["model"][codebook].clone()}}
        recoded["model"][codebook].view(-1)[0] += 0.01
        assert checkpoint.tokenizer_digest(recoded) != checkpoint.tokenizer_digest(payload), name


# -------------------------------------------------------------------------------------------------- training
def test_tiny_mdct_codec_overfits_one_real_clip(tmp_path: Path, clip_dir: Path, speech: np.ndarray) -> None:
    """100 steps on one clip more than halve its log-mel reconstruction error."""
    start = shutil.copy(train_codec(TINY_CONFIG, tmp_path / "run", clip_dir, 0), tmp_path / "step0.pt")
    end = train_codec(TINY_CONFIG, tmp_path / "run", clip_dir, 100)
    log_mel = LogMel(16000, **load_config(TINY_CONFIG)["codec_training"]["loss"]["mel"])
    wav = torch.from_numpy(speech)[None]

    def mel_error(path: Path) -> float:
        codec = checkpoint.load_codec(path)
        with torch.inference_mode():
            return F.l1_loss(log_mel(codec.decode(codec.encode(wav), wav.shape[-1])), log_mel(wav)).item()

    before, after = mel_error(start), mel_error(end)
    assert after < 0.5 * before, f"log-mel L1 {before:.3f} -> {after:.3f}"


def test_resumed_run_matches_uninterrupted_run(tmp_path: Path, clip_dir: Path) -> None:
    """3 + 3 steps give exactly the weights, discriminator and optimiser state of 6 uninterrupted steps."""
    straight = train_codec(TINY_CONFIG, tmp_path / "straight", clip_dir, 6)
    train_codec(TINY_CONFIG, tmp_path / "resumed", clip_dir, 3)
    resumed = train_codec(TINY_CONFIG, tmp_path / "resumed", clip_dir, 6)
    a, b = checkpoint.load(straight, "codec"), checkpoint.load(resumed, "codec")
    assert a["training"]["step"] == b["training"]["step"] == 6
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), f"model.{name} differs after resume"
    for name, value in a["training"]["discriminator"].items():
        assert torch.equal(value, b["training"]["discriminator"][name]), f"discriminator.{name} differs after resume"
    state_a = a["training"]["optimizers"]["generator"]["state"]
    state_b = b["training"]["optimizers"]["generator"]["state"]
    assert state_a and all(torch.equal(state_a[k]["exp_avg"], state_b[k]["exp_avg"]) for k in state_a)


def test_a_resumed_run_continues_its_logged_curve(tmp_path: Path, clip_dir: Path) -> None:
    """Resuming from an older checkpoint keeps the log up to it, logs the later steps again identically, carries
    the compute hours on and validates."""
    config = tiny_mel_config(tmp_path, codec_training={"cooldown_steps": 0},  # the same rates whatever the stop
                             run={"log_every": 1, "checkpoint_every": 2, "validate_every": 6})
    run_dir = tmp_path / "run"
    train_codec(config, run_dir, clip_dir, 4)  # checkpoints at 2 and 4
    first = _log_rows(run_dir / "log.csv")
    (run_dir / "checkpoint_00000004.pt").unlink()  # as if the run had stopped right after step 2's checkpoint
    train_codec(config, run_dir, clip_dir, 6, "--valid_dir", str(clip_dir))
    after = _log_rows(run_dir / "log.csv")

    kept = [row for row in first if row[0] <= 2]
    assert after[:len(kept)] == kept  # history up to the checkpoint is untouched
    new = after[len(kept):]
    assert {row[0] for row in new} == {3, 4, 5, 6}
    replayed = {(step, key): value for step, _, key, value in new if step <= 4}
    assert replayed == {(step, key): value for step, _, key, value in first if step > 2}  # same data, same losses
    last_hours = max(row[1] for row in kept)
    assert all(last_hours <= row[1] < last_hours + 0.05 for row in new)  # compute hours carry on, not from zero
    validated = {key for step, _, key, _ in new if key.startswith("valid/")}
    assert {"valid/estoi", "valid/pesq", "valid/mel_l1"} <= validated


def test_a_cool_down_brings_the_learning_rate_to_zero_where_the_run_stops(tmp_path: Path, clip_dir: Path) -> None:
    """The cool-down follows --max_steps: a stopped run resumed with a later stop cools down towards that one."""
    config = tiny_mel_config(tmp_path, codec_training={"warmup_steps": 0, "cooldown_steps": 6},
                             run={"log_every": 1})
    train_codec(config, tmp_path / "run", clip_dir, 4)  # stopped early: cooled towards its own stop at 4
    train_codec(config, tmp_path / "run", clip_dir, 10)  # resumed with the cool-down at its end
    rate = {step: value for step, _, key, value in _log_rows(tmp_path / "run" / "log.csv") if key == "train/lr"}
    peak = load_config(config)["codec_training"]["learning_rate"]
    # train/lr at step s is the rate of the next update: peak * (stop - s) / cooldown_steps within the cool-down.
    assert rate[3] == pytest.approx(peak * 1 / 6, rel=1e-4)
    assert rate[5] == pytest.approx(peak * 5 / 6, rel=1e-4) and rate[10] == 0.0


def test_mel_codec_reconstructs_speech_before_training_and_training_never_changes_its_tokens(
        tmp_path: Path, clip_dir: Path, speech: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    """The data-dependent start (log-mel statistics, k-means codebooks) already gives intelligible speech; training,
    resuming and --init_from train the decoder only and never run the start again, so the tokens stay final."""
    from pystoi import stoi

    config = tiny_mel_config(tmp_path)
    with caplog.at_level(logging.INFO, logger="train"):
        start = shutil.copy(train_codec(config, tmp_path / "run", clip_dir, 0), tmp_path / "step0.pt")
    assert "data-dependent start: log-mel statistics" in caplog.text
    wav = torch.from_numpy(speech)[None]
    fresh = checkpoint.load_codec(start)
    with torch.inference_mode():
        # Standardised by the statistics of its training speech (here: this clip alone).
        standardised = (fresh.log_mel(fresh.pad(wav)) - fresh.analysis_mean) / fresh.analysis_std
        tokens = fresh.encode(wav)
        score = stoi(speech, fresh.decode(tokens, wav.shape[-1])[0].numpy(), 16000, extended=True)
    assert standardised.mean(dim=-1).abs().mean() < 0.3 and (standardised.std(dim=-1) - 1).abs().mean() < 0.3
    assert score > 0.75, f"ESTOI {score:.3f}"

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train"):
        trained = checkpoint.load_codec(train_codec(config, tmp_path / "run", clip_dir, 6))  # resumes
        moved_on = checkpoint.load_codec(train_codec(config, tmp_path / "init_from", clip_dir, 2,
                                                     "--init_from", str(start)))
    assert "resuming from" in caplog.text and "data-dependent start" not in caplog.text
    with torch.inference_mode():
        assert torch.equal(trained.encode(wav), tokens) and torch.equal(moved_on.encode(wav), tokens)
    digest = checkpoint.tokenizer_digest(checkpoint.codec_payload(fresh))
    assert checkpoint.tokenizer_digest(checkpoint.codec_payload(trained)) == digest
    assert not torch.equal(trained.decoder.conv_out.parametrizations.weight.original0,
                           fresh.decoder.conv_out.parametrizations.weight.original0)  # yet the decoder learned


def test_mel_codec_refuses_the_discriminator(tmp_path: Path, clip_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A codec trained on spectra (no differentiable waveform) cannot train against the discriminator: exit 2."""
    config = tiny_mel_config(tmp_path, codec_training={"discriminator_start_step": 0})
    argv = ["--stage", "codec", "--config", str(config), "--checkpoint_dir", str(tmp_path / "run"),
            "--train_dir", str(clip_dir), "--max_steps", "1", "--device", "cpu"]
    assert train.main(argv) == 2
    assert "discriminator_start_step to -1" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("*.pt"))


def test_griffin_lim_recovers_intelligible_speech_from_an_exact_log_mel(speech: np.ndarray) -> None:
    """The demo codec's vocoder: deterministic, and intelligible from the exact log-mel of speech."""
    from pystoi import stoi

    codec_config = load_config(DEMO_CODEC_CONFIG)["codec"]
    mel = codec_config["mel"]
    log_mel = LogMel(16000, **mel)
    vocoder = MelGriffinLim(log_mel.filters, mel["hop_length"], mel["win_length"], **codec_config["griffin_lim"])
    wav = torch.from_numpy(speech)[None]
    first = vocoder(log_mel(wav), wav.shape[-1])
    assert first.shape == wav.shape
    assert torch.equal(first, vocoder(log_mel(wav), wav.shape[-1])), "same input, same output"
    assert stoi(speech, first[0].numpy(), 16000, extended=True) > 0.9


def test_the_iterations_frame_major_stft_is_the_projects_stft_up_to_a_fixed_phase_per_bin(speech: np.ndarray) -> None:
    """Griffin-Lim and the input blend transform with FrameSTFT: its magnitudes are utils.stft's, its phases differ
    by the same rotation per bin in every frame, its inverse is utils.istft's (exact reconstruction of a signal, the
    same least-squares inverse of any spectrogram), for long, odd-length, short and batched input."""
    from models.griffin_lim import FrameSTFT
    from utils import istft

    for n_fft, hop, win in ((512, 40, 320), (400, 80, 320), (320, 40, 320)):
        frame_stft = FrameSTFT(n_fft, hop, win)
        for wav in (torch.from_numpy(speech[:16007])[None], torch.from_numpy(speech[:200])[None],
                    torch.from_numpy(np.stack([speech[:8000], speech[8000:16000]]))):
            reference = stft(wav, n_fft, hop, win)
            rotated = frame_stft(wav)
            assert rotated.shape == reference.transpose(1, 2).shape
            assert torch.allclose(rotated, (reference * frame_stft.rotation[:, None]).transpose(1, 2), atol=1e-4)
            assert torch.allclose(frame_stft.inverse(rotated, wav.shape[-1]), wav, atol=1e-5)
        arbitrary = torch.randn(2, 30, n_fft // 2 + 1, dtype=torch.complex64)  # no signal has this spectrogram
        expected = istft((arbitrary / frame_stft.rotation).transpose(1, 2), n_fft, hop, win, 29 * hop + 7)
        assert torch.allclose(frame_stft.inverse(arbitrary, 29 * hop + 7), expected, atol=1e-5)
    with pytest.raises(UserError, match="must divide the window"):
        FrameSTFT(512, 48, 320)


def test_griffin_lim_from_the_integrated_phase_needs_few_iterations(speech: np.ndarray) -> None:
    """The iteration starts from the phase the log-magnitude's gradient implies: after a few iterations it is
    nearer a consistent spectrogram (the STFT of its own output matches the target magnitude better) than after
    the same iterations from zero phase, and a shorter FFT reads the same inverse filterbank."""
    from models.griffin_lim import integrated_phase

    class ZeroStart(MelGriffinLim):
        def initial_phase(self, magnitude: torch.Tensor) -> torch.Tensor:
            return torch.ones_like(magnitude, dtype=torch.complex64)

    mel = load_config(DEMO_CODEC_CONFIG)["codec"]["mel"]
    log_mel = LogMel(16000, **mel)
    wav = torch.from_numpy(speech)[None]
    target = log_mel(wav)

    def inconsistency(kind: type, iterations: int, n_fft: int = 512) -> float:
        vocoder = kind(log_mel.filters, mel["hop_length"], mel["win_length"], n_fft, iterations, 0.99, 10 ** 6, 32)
        rebuilt = stft(vocoder(target), n_fft, mel["hop_length"], mel["win_length"]).abs()
        aim = vocoder.magnitude(target).transpose(1, 2)[..., : rebuilt.shape[-1]]
        return float((rebuilt - aim).norm() / aim.norm())

    for iterations in (0, 4):
        assert inconsistency(MelGriffinLim, iterations) < 0.8 * inconsistency(ZeroStart, iterations)
    assert inconsistency(MelGriffinLim, 4, n_fft=320) < 0.8 * inconsistency(ZeroStart, 4, n_fft=320)
    dense = torch.linalg.pinv(log_mel.filters.double()).float()
    assert torch.allclose(MelGriffinLim.inverse_filterbank(log_mel.filters, 512), dense[::2])
    phase = integrated_phase(torch.rand(1, 30, 257), 512, 40, 320)
    assert phase.shape == (1, 30, 257) and torch.equal(phase[:, 0], torch.zeros(1, 257))


# ---------------------------------------------------------------------------------------------------- config
def test_a_config_can_build_on_another(tmp_path: Path) -> None:
    """A "base" config is laid under a config; a missing base is refused by name."""
    stage = write_config(tmp_path / "stage.json", {"base": "demo_codec.json",
                                                   "codec_training": {"loss": {"mel_l1": 1.0}}})
    config, demo = load_config(stage), load_config(DEMO_CODEC_CONFIG)
    assert config["codec_training"]["loss"]["mel_l1"] == 1.0
    assert config["codec"] == demo["codec"]
    assert config["codec"]["class"] == "MelCodec" != load_config()["codec"]["class"]
    stage.write_text('{"base": "missing.json"}')
    with pytest.raises(UserError, match="missing.json"):
        load_config(stage)


@pytest.mark.parametrize("overrides, key", [
    ({"codec": {"encoder": {"dimm": 3}}}, "codec.encoder.dimm"),
    ({"base": "demo_codec.json", "codec": {"mdct": {"frame_length": 80, "hop_length": 40}}}, "codec.mdct"),
    ({"codec": {"class": "MelCodec", "mdct": {"frame_length": 80, "hop_length": 40}}}, "codec.mdct"),
    ({"codec": load_config(DEMO_CODEC_CONFIG)["codec"] | {"quantizer": {"num_groups": 16, "codebook_size": 64,
                                                                        "projection": False}}}, "projection"),
], ids=["typo", "mdct_key_over_mel_base", "mdct_key_in_class_switched_section", "nested_key_in_switched_section"])
def test_unknown_config_key_is_refused_by_name(tmp_path: Path, overrides: dict, key: str) -> None:
    """A key no default has, and a key the section's class does not take once "class" switches it, are refused
    with their name, when the config is read or at the latest when the codec is built."""
    path = write_config(tmp_path / "bad.json", overrides)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config = load_config(path)
        build_codec(config["codec"], config["sample_rate"])


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_reload_gives_identical_tokens_in_a_fresh_process(tmp_path: Path, speech: np.ndarray) -> None:
    """A saved codec loads (in this process and another) into one that gives exactly the same tokens."""
    codec = _codec(TINY_CONFIG, seed=3)
    path = tmp_path / "codec.pt"
    checkpoint.save(path, checkpoint.codec_payload(codec))
    wav = torch.from_numpy(speech)[None]
    with torch.inference_mode():
        tokens = codec.encode(wav)
        assert torch.equal(checkpoint.load_codec(path).encode(wav), tokens)
    np.save(tmp_path / "wav.npy", speech)
    script = (
        "import sys, numpy as np, torch; sys.path.insert(0, sys.argv[1]);"
        "from checkpoint import load_codec;"
        "c = load_codec(sys.argv[2]); w = torch.from_numpy(np.load(sys.argv[3]))[None];"
        "np.save(sys.argv[4], c.encode(w).numpy())"
    )
    subprocess.run([sys.executable, "-c", script, str(REPO), str(path), str(tmp_path / "wav.npy"),
                    str(tmp_path / "tokens.npy")], check=True)
    assert np.array_equal(np.load(tmp_path / "tokens.npy"), tokens.numpy())


def test_exported_half_precision_checkpoint_loads_safely_and_sounds_the_same(tmp_path: Path,
                                                                              speech: np.ndarray) -> None:
    """`checkpoint.py export --half` drops the training state, keeps the history, loads with weights_only and
    decodes as the full-precision codec does; what decides the tokens stays exact, so the tokens, and the enhancers
    trained on them, stay valid."""
    codec = _codec(TINY_CONFIG, seed=4)
    training = {"step": 7, "compute_seconds": 1.0, "optimizers": {"generator": {"state": {}}}}
    checkpoint.save(tmp_path / "train.pt", checkpoint.codec_payload(codec) | {"training": training})
    assert checkpoint.main(["export", str(tmp_path / "train.pt"), str(tmp_path / "small.pt"), "--half"]) == 0
    small = torch.load(tmp_path / "small.pt", map_location="cpu", weights_only=True)
    assert "training" not in small and small["history"] == {"step": 7, "compute_seconds": 1.0}
    assert small["model"]["decoder.conv_mid.weight"].dtype == torch.float16
    assert checkpoint.tokenizer_digest(small) == checkpoint.tokenizer_digest(checkpoint.codec_payload(codec))
    wav = torch.from_numpy(speech)[None]
    small_codec = checkpoint.load_codec(tmp_path / "small.pt")
    with torch.inference_mode():
        tokens = codec.encode(wav)
        full, half = codec.decode(tokens), small_codec.decode(tokens)
        assert torch.equal(small_codec.encode(wav), tokens)
    assert (full - half).abs().max() < 1e-2 * full.abs().max()


def test_a_crafted_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """checkpoint.load never unpickles arbitrary objects: a file whose unpickling runs code is refused in one line
    and the code does not run."""
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return os.mkdir, (str(marker),)

    torch.save({"format": checkpoint.FORMAT, "kind": "codec", "config": {}, "model": {}, "x": Payload()},
               tmp_path / "evil.pt")
    with pytest.raises(UserError, match="not safe to load") as refused:
        checkpoint.load(tmp_path / "evil.pt")
    assert "evil.pt" in str(refused.value) and "\n" not in str(refused.value)
    assert not marker.exists()


def test_an_enhancer_names_its_codec_and_refuses_one_that_is_missing_or_gives_other_tokens(
        tmp_path: Path, clip_dir: Path, speech: np.ndarray, capsys: pytest.CaptureFixture) -> None:
    """An exported enhancer may name a codec file beside it instead of carrying it: any codec with the same tokens
    (e.g. the same MelCodec trained further), found relative to the enhancer; a missing or token-changing one is
    refused by name, when exporting and when loading."""
    config = tiny_mel_config(tmp_path)
    start = shutil.copy(train_codec(config, tmp_path / "codec", clip_dir, 0), tmp_path / "start.pt")
    later = train_codec(config, tmp_path / "codec", clip_dir, 3)  # same tokens, another decoder
    drifted = checkpoint.load(later, "codec")
    drifted["model"]["quantizer.codebooks"] = drifted["model"]["quantizer.codebooks"].roll(1, dims=1)
    checkpoint.save(tmp_path / "drifted.pt", drifted)

    assert train.main(["--stage", "enhancer", "--config", str(TINY_CONFIG), "--codec", str(start),
                       "--checkpoint_dir", str(tmp_path / "enh"), "--train_degraded_dir", str(clip_dir),
                       "--train_clean_dir", str(clip_dir), "--max_steps", "1", "--device", "cpu"]) == 0
    enhancer = latest_checkpoint(tmp_path / "enh")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(later, shipped / "codec.pt")
    assert checkpoint.main(["export", str(enhancer), str(tmp_path / "carrying.pt")]) == 0
    assert checkpoint.main(["export", str(enhancer), str(shipped / "enhancer.pt"),
                            "--name_codec", str(shipped / "codec.pt")]) == 0
    assert (shipped / "enhancer.pt").stat().st_size < (tmp_path / "carrying.pt").stat().st_size
    assert checkpoint.main(["export", str(enhancer), str(tmp_path / "refused.pt"),
                            "--name_codec", str(tmp_path / "drifted.pt")]) == 2
    assert "gives other tokens" in capsys.readouterr().err
    assert not (tmp_path / "refused.pt").exists()

    moved = tmp_path / "moved"
    shutil.copytree(shipped, moved)  # the reference is relative: the pair can move together
    _, named, _ = checkpoint.load_enhancer(moved / "enhancer.pt")
    carried = checkpoint.load_codec(later)
    assert torch.equal(named.decoder.conv_out.parametrizations.weight.original0,
                       carried.decoder.conv_out.parametrizations.weight.original0)
    shutil.copy(tmp_path / "drifted.pt", moved / "codec.pt")
    with pytest.raises(UserError, match="gives other tokens"):
        checkpoint.load_enhancer(moved / "enhancer.pt")
    (moved / "codec.pt").unlink()
    with pytest.raises(UserError, match="codec.pt is missing"):
        checkpoint.load_enhancer(moved / "enhancer.pt")


def test_a_codec_setting_that_keeps_its_tokens_can_be_changed_without_retraining(tmp_path: Path, speech: np.ndarray,
                                                                                  capsys: pytest.CaptureFixture) -> None:
    """`checkpoint.py export --set griffin_lim.iterations=N` retunes the shipped codec's vocoder: same tokens (an
    enhancer naming the codec still accepts it), new setting in effect; a tokenizer setting, an unknown key or a
    value that no longer fits the weights is one line and writes nothing."""
    shipped = REPO / "pretrained" / "demo_codec.pt"
    out = tmp_path / "codec.pt"
    assert checkpoint.main(["export", str(shipped), str(out), "--set", "griffin_lim.iterations=3"]) == 0
    before, after = checkpoint.load_codec(shipped), checkpoint.load_codec(out)
    assert after.griffin_lim.iterations == 3 != before.griffin_lim.iterations
    assert checkpoint.tokenizer_digest(checkpoint.load(out)) == checkpoint.tokenizer_digest(checkpoint.load(shipped))
    wav = torch.from_numpy(speech)[None]
    with torch.inference_mode():
        assert torch.equal(after.encode(wav), before.encode(wav))
    capsys.readouterr()
    for setting, words in (("quantizer.num_groups=8", "decides the codec's tokens"), ("griffin_lim.iterationz=3",
                           "iterationz"), ("decoder.dim=64", "does not match weights"),
                           ("griffin_lim.iterations", "KEY=VALUE")):
        assert checkpoint.main(["export", str(shipped), str(tmp_path / "refused.pt"), "--set", setting]) == 2
        assert words in capsys.readouterr().err
        assert not (tmp_path / "refused.pt").exists()


def test_griffin_lim_synthesises_only_around_the_frames_asked_for(speech: np.ndarray, other_speech: np.ndarray) -> None:
    """With `needed` (the input blend's fill), the iteration runs only on stretches around the needed frames: far
    less work for a few frames, silence elsewhere, and at the needed frames a spectrum as near the target as the
    whole recording's iteration gives (two stretches, iterated as one sequence, each as well as alone); asked for
    everything, it is the whole recording's iteration exactly."""
    codec_config = load_config(DEMO_CODEC_CONFIG)["codec"]
    mel = codec_config["mel"]
    log_mel = LogMel(16000, **mel)
    clip = np.concatenate([speech, other_speech])
    target = log_mel(torch.from_numpy(clip)[None])
    frames, hop = target.shape[-1], mel["hop_length"]
    vocoder = MelGriffinLim(log_mel.filters, hop, mel["win_length"],
                            **codec_config["griffin_lim"] | {"chunk_frames": 300})
    needed = torch.zeros(frames, dtype=torch.bool)
    needed[frames // 4: frames // 4 + 5] = True
    needed[2 * frames // 3: 2 * frames // 3 + 5] = True
    stretches = vocoder.stretches(frames, needed)
    assert len(stretches) == 2 and all(end - first < frames / 8 for first, end in stretches)
    assert vocoder.stretches(frames, torch.ones(frames, dtype=torch.bool)) == [(0, frames)]
    assert vocoder.stretches(frames, torch.zeros(frames, dtype=torch.bool)) == []
    both = vocoder(target, clip.size, needed)
    whole = vocoder(target, clip.size)
    assert torch.equal(vocoder(target, clip.size, torch.ones(frames, dtype=torch.bool)), whole)
    (first_a, end_a), (first_b, end_b) = stretches
    assert not both[0, : first_a * hop].any() and not both[0, end_a * hop: first_b * hop].any()
    assert not both[0, end_b * hop:].any()

    def error(wav: torch.Tensor, frames_asked: torch.Tensor) -> float:
        aim = vocoder.magnitude(target)[0, frames_asked]
        rebuilt = stft(wav, vocoder.n_fft, hop, mel["win_length"])[0].abs().T[frames_asked]
        return float((rebuilt - aim).norm() / aim.norm())

    assert error(both, needed) < 1.2 * error(whole, needed) + 0.02
    for first, end in stretches:
        alone = needed.clone()
        alone[:first], alone[end:] = False, False
        assert error(both, alone) < 1.2 * error(vocoder(target, clip.size, alone), alone) + 0.02


def test_griffin_lim_in_chunks_sounds_like_one_piece_and_runs_concurrently_unchanged(speech: np.ndarray,
                                                                                    other_speech: np.ndarray) -> None:
    """A long input iterates in overlapping chunks: as intelligible as one piece, seamless (no jump at a chunk
    edge), and the chunks as concurrent tasks (cpu_speed) give exactly the sequential result."""
    from pystoi import stoi

    import cpu_speed

    codec_config = load_config(DEMO_CODEC_CONFIG)["codec"]
    mel = codec_config["mel"]
    log_mel = LogMel(16000, **mel)
    clip = np.concatenate([speech, other_speech])
    target = log_mel(torch.from_numpy(clip)[None])
    settings = {**codec_config["griffin_lim"], "iterations": 8}
    whole = MelGriffinLim(log_mel.filters, mel["hop_length"], mel["win_length"], **settings | {"chunk_frames": 10**6})
    chunked = MelGriffinLim(log_mel.filters, mel["hop_length"], mel["win_length"], **settings | {"chunk_frames": 300})
    assert len(chunked.chunks(target.shape[-1])) >= 5
    one, pieces = whole(target, clip.size)[0].numpy(), chunked(target, clip.size)[0].numpy()
    assert stoi(clip, pieces, 16000, extended=True) > stoi(clip, one, 16000, extended=True) - 0.01
    assert np.sqrt(np.mean(pieces ** 2)) == pytest.approx(np.sqrt(np.mean(one ** 2)), rel=0.05)
    threads = torch.get_num_threads()  # 1 (conftest): each concurrent task runs on one thread, as here
    torch.set_num_threads(2)
    try:
        cpu_speed.parallelize_vocoder(type("Codec", (), {"griffin_lim": chunked})())
        with torch.inference_mode():
            assert np.array_equal(chunked(target, clip.size)[0].numpy(), pieces)
    finally:
        torch.set_num_threads(threads)
