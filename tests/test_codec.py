"""The codec: perfect MDCT reconstruction, token shapes, group independence, training and persistence."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY_CONFIG, example_clips
from models.codec import Codec
from models.losses import LogMel
from models.mdct import MDCT, bin_correlation
from utils import UserError, load_audio, load_config, save_audio, seed_everything
import train


def test_mdct_reconstructs_real_speech_exactly(speech, other_speech):
    mdct = MDCT(80, 40)
    x = torch.from_numpy(speech)
    assert (mdct.inverse(mdct(x), x.shape[0]) - x).abs().max() < 1e-5
    length = min(len(speech), len(other_speech)) - 7  # not a multiple of the hop
    batch = torch.stack([torch.from_numpy(speech[:length]), torch.from_numpy(other_speech[:length])])
    assert (mdct.inverse(mdct(batch), length) - batch).abs().max() < 1e-5


def test_mdct_correlation_measures_phase_not_magnitude():
    clips = [load_audio(path)[0] for path in example_clips()]
    length = min(len(c) for c in clips)
    mdct = MDCT(80, 40)(torch.from_numpy(np.stack([c[:length] for c in clips])))  # 5 clips pooled
    random_signs = torch.where(torch.rand(mdct.shape, generator=torch.Generator().manual_seed(0)) < 0.5, -1.0, 1.0)
    assert torch.allclose(bin_correlation(mdct, 0.3 * mdct), torch.ones(40), atol=1e-5)  # level does not matter
    assert torch.allclose(bin_correlation(mdct, -mdct), -torch.ones(40), atol=1e-5)
    # Exact magnitudes with the wrong phase: near 0 (single bins scatter, since a few transients can hold much
    # of a bin's energy).
    wrong_phase = bin_correlation(mdct, mdct.abs() * random_signs)
    assert wrong_phase.mean().abs() < 0.05 and wrong_phase[:5].mean().abs() < 0.1, wrong_phase


@pytest.mark.parametrize("spectra, latent_rate_trunk", [(("mdct", "mdct"), False), (("log_mel", "log_mel"), True)],
                         ids=["paper", "log_mel_latent_rate"])
def test_paper_codec_token_shapes_and_any_length(speech, spectra, latent_rate_trunk):
    seed_everything(0)
    config = load_config()
    config["codec"]["encoder"]["input"], config["codec"]["decoder"]["output"] = spectra
    for side in ("encoder", "decoder"):
        config["codec"][side]["latent_rate_trunk"] = latent_rate_trunk
    codec = Codec.from_config(config).eval()
    wav = torch.from_numpy(speech[:31960])[None]
    with torch.inference_mode():
        tokens = codec.encode(wav)
        assert tokens.shape == (1, 4, 100)
        assert tokens.dtype == torch.int64 and tokens.min() >= 0 and tokens.max() < 256
        assert codec.decode(tokens, 31960).shape == (1, 31960)
        assert codec.decode(tokens).shape == (1, 31960)  # token-aligned lengths need no hint
        for length in (1, 333, 12345, 16000):
            out = codec.decode(codec.encode(wav[:, :length]), length)
            assert out.shape == (1, length)


def test_changing_latent_group_changes_only_its_token_stream(speech):
    seed_everything(0)
    codec = Codec.from_config(load_config()).eval()
    with torch.inference_mode():
        latent = codec.encoder(codec.mdct(codec.pad(torch.from_numpy(speech[:31960])[None])))
        base = codec.quantizer(latent).tokens
        for group in range(4):
            changed = latent.clone()
            changed[:, group * 8 : (group + 1) * 8] = torch.randn_like(changed[:, :8])
            tokens = codec.quantizer(changed).tokens
            for stream in range(4):
                same = torch.equal(tokens[:, stream], base[:, stream])
                assert same == (stream != group), f"group {group} perturbed, stream {stream} same={same}"


def _train_codec(tmp_path, clip_dir, max_steps, run_dir="run", extra=()):
    argv = ["--stage", "codec", "--config", str(TINY_CONFIG), "--checkpoint_dir", str(tmp_path / run_dir),
            "--train_dir", str(clip_dir), "--max_steps", str(max_steps), "--device", "cpu", *extra]
    assert train.main(argv) == 0
    return sorted((tmp_path / run_dir).glob("checkpoint_*.pt"))[-1]


@pytest.fixture()
def clip_dir(tmp_path, speech):
    folder = tmp_path / "clip"
    save_audio(folder / "speech.wav", speech)
    return folder


def test_tiny_codec_overfits_one_real_clip(tmp_path, clip_dir, speech):
    start = _train_codec(tmp_path, clip_dir, 0).rename(tmp_path / "step0.pt")  # keep_last would prune it
    end = _train_codec(tmp_path, clip_dir, 300)
    config = load_config(TINY_CONFIG)
    log_mel = LogMel.from_config(config)
    wav = torch.from_numpy(speech)[None]

    def mel_error(path):
        codec = Codec.load(path)
        with torch.inference_mode():
            return F.l1_loss(log_mel(codec.decode(codec.encode(wav), wav.shape[-1])), log_mel(wav)).item()

    before, after = mel_error(start), mel_error(end)
    assert after < 0.5 * before, f"log-mel L1 {before:.3f} -> {after:.3f}"


def test_checkpoint_reload_gives_identical_tokens_in_a_fresh_process(tmp_path, speech):
    seed_everything(3)
    codec = Codec.from_config(load_config(TINY_CONFIG)).eval()
    path = tmp_path / "codec.pt"
    codec.save(path)
    wav = torch.from_numpy(speech)[None]
    with torch.inference_mode():
        tokens = codec.encode(wav)
        assert torch.equal(Codec.load(path).encode(wav), tokens)
    np.save(tmp_path / "wav.npy", speech)
    script = (
        "import sys, numpy as np, torch; sys.path.insert(0, sys.argv[1]);"
        "from models.codec import Codec;"
        "c = Codec.load(sys.argv[2]); w = torch.from_numpy(np.load(sys.argv[3]))[None];"
        "np.save(sys.argv[4], c.encode(w).numpy())"
    )
    subprocess.run([sys.executable, "-c", script, str(REPO), str(path), str(tmp_path / "wav.npy"),
                    str(tmp_path / "tokens.npy")], check=True)
    assert np.array_equal(np.load(tmp_path / "tokens.npy"), tokens.numpy())


def test_resumed_run_matches_uninterrupted_run(tmp_path, clip_dir):
    straight = _train_codec(tmp_path, clip_dir, 6, run_dir="straight")
    _train_codec(tmp_path, clip_dir, 3, run_dir="resumed")
    resumed = _train_codec(tmp_path, clip_dir, 6, run_dir="resumed")
    a, b = torch.load(straight, weights_only=False), torch.load(resumed, weights_only=False)
    assert a["step"] == b["step"] == 6
    for key in ("model", "discriminator"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name} differs after resume"
    state_a, state_b = a["optimizer_g"]["state"], b["optimizer_g"]["state"]
    assert all(torch.equal(state_a[k]["exp_avg"], state_b[k]["exp_avg"]) for k in state_a)


def test_a_config_can_build_on_another(tmp_path):
    stage = tmp_path / "stage.json"
    stage.write_text('{"base": "%s", "codec": {"loss": {"mdct_mse": 1.0}}}' % (REPO / "configs" / "demo.json"))
    config, demo = load_config(stage), load_config(REPO / "configs" / "demo.json")
    assert config["codec"]["loss"]["mdct_mse"] == 1.0
    assert config["codec"]["encoder"] == demo["codec"]["encoder"] != load_config()["codec"]["encoder"]
    stage.write_text('{"base": "missing.json"}')
    with pytest.raises(UserError, match="missing.json"):
        load_config(stage)


def test_unknown_config_key_is_refused_by_name(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"codec": {"encoder": {"dimm": 3}}}')
    with pytest.raises(UserError, match="codec.encoder.dimm"):
        load_config(bad)


def test_exported_half_precision_checkpoint_loads_and_sounds_the_same(tmp_path, speech):
    sys.path.insert(0, str(REPO / "scripts"))
    import export_model

    seed_everything(4)
    codec = Codec.from_config(load_config(TINY_CONFIG)).eval()
    payload = codec.checkpoint_payload() | {"optimizer_g": {"state": {}}, "step": 7, "compute_seconds": 1.0}
    torch.save(payload, tmp_path / "train.pt")
    assert export_model.main([str(tmp_path / "train.pt"), str(tmp_path / "small.pt"), "--half"]) == 0
    small = torch.load(tmp_path / "small.pt", weights_only=False)
    assert "optimizer_g" not in small and small["step"] == 7
    wav = torch.from_numpy(speech)[None]
    with torch.inference_mode():
        full, half = codec.decode(codec.encode(wav)), Codec.load(tmp_path / "small.pt").decode(codec.encode(wav))
    assert (full - half).abs().max() < 1e-2 * full.abs().max()


def _log_rows(path) -> list[tuple[int, float, str, float]]:
    import csv
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["compute_hours"]), r["key"], float(r["value"])) for r in csv.DictReader(f)]


@pytest.mark.parametrize("run, config_name", [("demo_codec", "demo.json"), ("demo_mel_decoder", "demo_mel_decoder.json"),
                                              ("demo_fast_codec_16x1024", "demo_fast_codec_16x1024.json"),
                                              ("demo_split_vq_codec", "demo_split_vq_codec.json")])
def test_committed_demo_codec_run_resumes_and_continues_its_curve(tmp_path, clip_dir, run, config_name):
    """A fresh clone resumes a committed demo codec run: the next logged point follows the last one."""
    import json
    import shutil

    committed = sorted((REPO / "training" / run).glob("checkpoint_*.pt"))
    assert committed, f"no committed checkpoint under training/{run}"
    run_dir = tmp_path / run
    run_dir.mkdir()
    shutil.copy(committed[-1], run_dir)
    shutil.copy(REPO / "training" / run / "log.csv", run_dir)
    before = _log_rows(run_dir / "log.csv")
    last_step = int(committed[-1].stem.split("_")[1])
    config = tmp_path / "log_every_step.json"
    demo = json.loads((REPO / "configs" / config_name).read_text())
    if "base" in demo:
        demo["base"] = str(REPO / "configs" / demo["base"])
    demo.setdefault("run", {})
    demo.setdefault("data", {})
    demo["run"] |= {"log_every": 1, "validate_every": last_step + 2, "validation_dnsmos": False}
    demo["data"] |= {"num_workers": 0, "validation_files": 1}
    config.write_text(json.dumps(demo))
    done = subprocess.run([sys.executable, "train.py", "--stage", "codec", "--config", str(config), "--checkpoint_dir",
                           str(run_dir), "--train_dir", str(clip_dir), "--valid_dir", str(clip_dir),
                           "--max_steps", str(last_step + 2),
                           "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / f"checkpoint_{last_step + 2:08d}.pt").is_file()

    after = _log_rows(run_dir / "log.csv")
    kept = [row for row in before if row[0] <= last_step]
    assert after[:len(kept)] == kept  # history up to the checkpoint is untouched
    new = after[len(kept):]
    assert {row[0] for row in new} == {last_step + 1, last_step + 2}
    last_hours = max(row[1] for row in kept)
    assert all(last_hours <= row[1] < last_hours + 0.05 for row in new)  # compute hours carry on, not from zero
    # The loss carries on from the trained level; an untrained codec starts several times higher.
    trained = [row[3] for row in kept if row[2] == "train/mel_l1"][-5:]
    resumed = [row[3] for row in new if row[2] == "train/mel_l1"]
    assert max(resumed) < 1.5 * np.mean(trained), (resumed, trained)
    validated = {row[2]: row[3] for row in new if row[2].startswith("valid/")}
    assert {"valid/estoi", "valid/pesq"} <= set(validated)
    if run == "demo_codec":  # an MDCT decoder: does it reproduce the phase?
        assert -1 <= validated["valid/mdct_correlation_below_1khz"] <= 1


def test_frozen_tokenizer_keeps_tokens_while_the_decoder_trains_and_enhancers_can_take_the_new_decoder(
        tmp_path, clip_dir, speech, capsys):
    import json
    import shutil

    sys.path.insert(0, str(REPO / "scripts"))
    import export_model

    config = json.loads(TINY_CONFIG.read_text())
    config["codec"]["train"]["freeze_tokenizer_step"] = 3
    freezing = tmp_path / "freeze.json"
    freezing.write_text(json.dumps(config))
    at_freeze = shutil.copy(_train_codec(tmp_path, clip_dir, 3, extra=("--config", str(freezing))), tmp_path / "at3.pt")
    shutil.copytree(tmp_path / "run", tmp_path / "unfrozen")
    later = _train_codec(tmp_path, clip_dir, 8, extra=("--config", str(freezing)))
    drifted = _train_codec(tmp_path, clip_dir, 8, run_dir="unfrozen")  # the same run without the freeze

    wav = torch.from_numpy(speech)[None]
    before, after = Codec.load(at_freeze), Codec.load(later)
    with torch.inference_mode():
        assert torch.equal(before.encode(wav), after.encode(wav))
    assert not torch.equal(before.decoder.conv_out.parametrizations.weight.original1,
                           after.decoder.conv_out.parametrizations.weight.original1)

    assert train.main(["--stage", "enhancer", "--config", str(TINY_CONFIG), "--codec", str(at_freeze),
                       "--checkpoint_dir", str(tmp_path / "enh"), "--train_degraded_dir", str(clip_dir),
                       "--train_clean_dir", str(clip_dir), "--max_steps", "1"]) == 0
    enhancer = sorted((tmp_path / "enh").glob("*.pt"))[-1]
    assert export_model.main([str(enhancer), str(tmp_path / "swapped.pt"), "--codec", str(later)]) == 0
    carried = Codec.load(tmp_path / "swapped.pt")
    assert torch.equal(carried.decoder.conv_out.parametrizations.weight.original1,
                       after.decoder.conv_out.parametrizations.weight.original1)
    assert export_model.main([str(enhancer), str(tmp_path / "refused.pt"), "--codec", str(drifted)]) == 2
    assert "differs from the enhancer's codec" in capsys.readouterr().err
    assert not (tmp_path / "refused.pt").exists()

    # Naming instead of carrying: the shipped pair stores the codec once, and a load checks it still fits.
    from models import load_enhancer
    from utils import UserError

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(later, shipped / "codec.pt")
    assert export_model.main([str(enhancer), str(shipped / "enhancer.pt"), "--half",
                              "--name_codec", str(shipped / "codec.pt")]) == 0
    assert (shipped / "enhancer.pt").stat().st_size < (tmp_path / "swapped.pt").stat().st_size
    moved = tmp_path / "moved"
    shutil.copytree(shipped, moved)  # the reference is relative: the pair can move together
    _, named = load_enhancer(moved / "enhancer.pt")
    assert torch.equal(named.decoder.conv_out.parametrizations.weight.original1,
                       after.decoder.conv_out.parametrizations.weight.original1)
    shutil.copy(drifted, moved / "codec.pt")
    with pytest.raises(UserError, match="gives other tokens"):
        load_enhancer(moved / "enhancer.pt")
    (moved / "codec.pt").unlink()
    with pytest.raises(UserError, match="codec.pt is missing"):
        load_enhancer(moved / "enhancer.pt")


def test_griffin_lim_recovers_intelligible_speech_from_an_exact_log_mel(speech):
    from pystoi import stoi

    from models.griffin_lim import MelGriffinLim

    config = load_config(str(REPO / "configs" / "demo_mel_decoder.json"))
    wav = torch.from_numpy(speech)[None]
    vocoder = MelGriffinLim.from_config(config)
    first = vocoder(LogMel.from_config(config)(wav), wav.shape[-1])
    assert first.shape == wav.shape
    assert torch.equal(first, vocoder(LogMel.from_config(config)(wav), wav.shape[-1])), "same input, same output"
    assert stoi(speech, first[0].numpy(), 16000, extended=True) > 0.9


def _log_mel_config(tmp_path, **train_overrides):
    import json

    config = json.loads(TINY_CONFIG.read_text())
    config["codec"]["decoder"]["output"] = "log_mel"
    config["codec"]["griffin_lim"] = {"iterations": 8}
    config["codec"]["train"] |= {"discriminator_start_step": -1, "freeze_tokenizer_step": 0} | train_overrides
    path = tmp_path / "log_mel.json"
    path.write_text(json.dumps(config))
    return path


def test_a_log_mel_decoder_learns_on_the_tokens_of_a_trained_mdct_codec(tmp_path, clip_dir, speech, caplog):
    import shutil

    mdct_codec = _train_codec(tmp_path, clip_dir, 4, run_dir="mdct")
    with caplog.at_level("INFO", logger="train"):
        start = _train_codec(tmp_path, clip_dir, 0, run_dir="mel", extra=(
            "--config", str(_log_mel_config(tmp_path)), "--init_from", str(mdct_codec)))
    assert "decoder.conv_out start afresh" in caplog.text
    start = shutil.copy(start, tmp_path / "mel_step0.pt")  # the run resumes from it; keep_last would prune it
    end = _train_codec(tmp_path, clip_dir, 150, run_dir="mel", extra=("--config", str(_log_mel_config(tmp_path))))
    wav = torch.from_numpy(speech)[None]
    log_mel = LogMel.from_config(load_config(TINY_CONFIG))

    def spectrum_error(path):
        codec = Codec.load(path)
        with torch.inference_mode():
            decoded = codec.decode_spectrum(codec.encode(wav))
            return F.l1_loss(decoded, log_mel(codec.pad(wav))).item()

    with torch.inference_mode():
        tokens = Codec.load(mdct_codec).encode(wav)
        trained = Codec.load(end)
        assert torch.equal(trained.encode(wav), tokens), "the tokens of the MDCT codec stay valid"
        assert trained.decode(tokens, wav.shape[-1]).shape == wav.shape
    # The fresh head starts at the data's mean spectrum (Codec.init_data_statistics), so the bar is the best
    # constant spectrum: a decoder below it has learned from the tokens.
    target = log_mel(Codec.load(end).pad(wav))
    constant = F.l1_loss(target.median(dim=-1, keepdim=True).values.expand_as(target), target).item()
    assert spectrum_error(start) > 0.95 * constant
    assert spectrum_error(end) < 0.8 * constant


def test_a_log_mel_decoder_refuses_the_discriminator(tmp_path, clip_dir, capsys):
    config = _log_mel_config(tmp_path, discriminator_start_step=0)
    argv = ["--stage", "codec", "--config", str(config), "--checkpoint_dir", str(tmp_path / "run"),
            "--train_dir", str(clip_dir), "--max_steps", "1", "--device", "cpu"]
    assert train.main(argv) == 2
    assert "discriminator_start_step to -1" in capsys.readouterr().err


def test_quantiser_warm_up_ends_in_k_means_codebooks_that_fit_the_latent(tmp_path, clip_dir, speech, caplog):
    import shutil

    config = json.loads(TINY_CONFIG.read_text())
    config["codec"]["train"] |= {"quantizer_warmup_steps": 4, "init_segments": 32, "kmeans_iterations": 10}
    path = tmp_path / "warm_up.json"
    path.write_text(json.dumps(config))
    extra = ("--config", str(path))
    warm = shutil.copy(_train_codec(tmp_path, clip_dir, 4, run_dir="resumed", extra=extra), tmp_path / "warm.pt")
    with caplog.at_level("INFO", logger="train"):
        resumed = _train_codec(tmp_path, clip_dir, 6, run_dir="resumed", extra=extra)
    assert "codebooks set by k-means" in caplog.text
    straight = _train_codec(tmp_path, clip_dir, 6, run_dir="straight", extra=extra)
    a, b = torch.load(straight, weights_only=False)["model"], torch.load(resumed, weights_only=False)["model"]
    assert all(torch.equal(value, b[name]) for name, value in a.items()), "k-means at a resume gives the same codec"

    def quantisation_error(checkpoint):
        """Relative distance between what the decoder gets from the tokens and from the continuous latent."""
        codec = Codec.load(checkpoint)
        with torch.inference_mode():
            latent = codec.encoder(codec.mdct(codec.pad(torch.from_numpy(speech)[None])))
            quantised = codec.quantizer(latent).latent
            codec.bypass_quantizer(True)
            continuous = codec.quantizer(latent).latent
        return ((quantised - continuous).norm() / continuous.norm()).item()

    before, after = quantisation_error(warm), quantisation_error(resumed)
    assert after < 0.5 * before, f"quantisation error {before:.3f} (random codebook) -> {after:.3f} (k-means)"


def test_a_fresh_log_mel_codec_starts_from_the_statistics_of_its_training_speech(tmp_path, clip_dir, speech):
    """Standardised log-mel input and a decoder whose mean spectrum is the data's, before the first step."""
    config = json.loads(_log_mel_config(tmp_path, freeze_tokenizer_step=-1).read_text())
    config["codec"]["encoder"] |= {"input": "log_mel", "latent_rate_trunk": True}
    config["codec"]["decoder"]["latent_rate_trunk"] = True
    path = tmp_path / "fresh.json"
    path.write_text(json.dumps(config))
    codec = Codec.load(_train_codec(tmp_path, clip_dir, 0, extra=("--config", str(path))))
    wav = codec.pad(torch.from_numpy(speech)[None])  # the only training speech, so its statistics are the data's
    with torch.inference_mode():
        analysis = codec.analyse(wav)
        decoded = codec.decode_spectrum(codec.encode(wav))
        target = LogMel.from_config(codec.config)(wav)
    assert analysis.mean(dim=-1).abs().mean() < 0.3 and (analysis.std(dim=-1) - 1).abs().mean() < 0.3
    assert (decoded.mean() - target.mean()).abs() < 0.5 < target.mean().abs()


def test_a_cool_down_brings_the_learning_rate_to_zero_where_the_run_stops(tmp_path, clip_dir):
    config = json.loads(TINY_CONFIG.read_text())
    config["codec"]["train"] |= {"cooldown_steps": 6}
    config["run"] |= {"log_every": 1}
    path = tmp_path / "cool.json"
    path.write_text(json.dumps(config))
    _train_codec(tmp_path, clip_dir, 4, extra=("--config", str(path)))  # stopped early: full rate, as at step 0
    _train_codec(tmp_path, clip_dir, 10, extra=("--config", str(path)))  # resumed with the cool-down at its end
    rate = {step: value for step, _, key, value in _log_rows(tmp_path / "run" / "log.csv") if key == "train/lr"}
    peak = config["codec"]["train"]["learning_rate"]
    # train/lr at step s is the rate of the next update: peak * (stop - s) / cooldown_steps within the cool-down.
    assert rate[3] == pytest.approx(peak * 1 / 6, rel=1e-4)  # the first run cooled towards its own stop at 4
    assert rate[5] == pytest.approx(peak * 5 / 6, rel=1e-4) and rate[10] == 0.0


def _split_vq_config(tmp_path, **overrides):
    """The tiny codec with the demo codec's tokenizer: frame means of the log-mel, split VQ fitted by k-means."""
    config = json.loads(_log_mel_config(tmp_path, init_segments=32, kmeans_iterations=10).read_text())
    config["codec"]["encoder"] |= {"input": "log_mel", "kind": "frame_mean", "latent_dim": 80}
    config["codec"]["decoder"] |= {"skip": True, "latent_rate_trunk": True}
    config["codec"]["quantizer"] = {"num_groups": 16, "codebook_size": 64, "projection": False} | overrides
    path = tmp_path / "split_vq.json"
    path.write_text(json.dumps(config))
    return path


def test_a_split_vq_codec_reconstructs_speech_before_training_and_training_keeps_its_tokens(
        tmp_path, clip_dir, speech, caplog):
    import shutil

    from pystoi import stoi

    config = ("--config", str(_split_vq_config(tmp_path)))
    with caplog.at_level("INFO", logger="train"):
        start = shutil.copy(_train_codec(tmp_path, clip_dir, 0, extra=config), tmp_path / "step0.pt")
    assert "codebooks set by k-means on the fixed encoder's latents" in caplog.text
    wav = torch.from_numpy(speech)[None]
    fresh = Codec.load(start)
    with torch.inference_mode():
        tokens = fresh.encode(wav)
        score = stoi(speech, fresh.decode(tokens, wav.shape[-1])[0].numpy(), 16000, extended=True)
        assert score > 0.75
        # Token n reads only band group n: changing the top bands' frame means changes only the last stream.
        frames = fresh.encoder(fresh.analyse(fresh.pad(wav)))
        frames[:, -5:] += 3.0
        changed = fresh.quantizer(frames).tokens != tokens
    assert changed[:, -1].any() and not changed[:, :-1].any()

    caplog.clear()
    with caplog.at_level("INFO", logger="train"):
        trained = Codec.load(_train_codec(tmp_path, clip_dir, 6, extra=config))  # resumes: k-means never again
        moved_on = Codec.load(_train_codec(tmp_path, clip_dir, 2, run_dir="init_from",
                                           extra=(*config, "--init_from", str(start))))
    assert "k-means" not in caplog.text
    with torch.inference_mode():
        assert torch.equal(trained.encode(wav), tokens) and torch.equal(moved_on.encode(wav), tokens)
    assert Codec.tokenizer_digest(trained.checkpoint_payload()) == Codec.tokenizer_digest(fresh.checkpoint_payload())
    assert not torch.equal(trained.decoder.conv_out.parametrizations.weight.original0,
                           fresh.decoder.conv_out.parametrizations.weight.original0)


def test_a_split_vq_codec_with_projections_is_refused_by_name(tmp_path, clip_dir, capsys):
    assert train.main(["--stage", "codec", "--config", str(_split_vq_config(tmp_path, projection=True)),
                       "--checkpoint_dir", str(tmp_path / "run"), "--train_dir", str(clip_dir), "--max_steps", "1",
                       "--device", "cpu"]) == 2
    assert "codec.quantizer.projection false" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("*.pt"))
