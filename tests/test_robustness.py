"""Bad input, wrong arguments and interrupted runs: a clear line for each, nothing lost, nothing done twice."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

import inference
import train
from conftest import REPO, TINY_CONFIG
from models.codec import Codec
from models.paragse import ParaGSE
from utils import load_audio, load_config, save_audio, seed_everything


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """A random-weight tiny ParaGSE checkpoint (with its codec) and the bare codec checkpoint."""
    folder = tmp_path_factory.mktemp("ckpt")
    config = load_config(TINY_CONFIG)
    seed_everything(0)
    codec = Codec.from_config(config)
    model = ParaGSE(config, codec.num_streams, codec.codebook_size)
    torch.save(model.checkpoint_payload(codec.checkpoint_payload()), folder / "enhancer.pt")
    codec.save(folder / "codec.pt")
    return folder / "enhancer.pt", folder / "codec.pt"


def _write(path, audio, rate, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate, **kwargs)


def _bad_input_folder(root, speech):
    """One file of every awkward kind; returns {relative name: expected outcome}."""
    import soxr

    clip = speech[:16000]
    expected = {}

    def good(name, audio, rate, note=None, **kwargs):
        _write(root / name, audio, rate, **kwargs)
        expected[name] = ("ok", note)

    good("plain.wav", clip, 16000)
    for rate in (8000, 22050, 44100, 48000):
        good(f"rates/r{rate}.wav", soxr.resample(clip, 16000, rate), rate, note=f"resampled {rate}→16000")
    good("stereo.wav", np.stack([clip, 0.5 * clip], 1), 16000, note="mixed 2 channels to mono")
    good("six_channels.wav", np.repeat(clip[:, None], 6, 1), 16000, note="mixed 6 channels to mono")
    good("pcm24.wav", clip, 16000, subtype="PCM_24")
    good("float.wav", clip, 16000, subtype="FLOAT")
    good("formats/clip.flac", clip, 16000)
    good("formats/clip.ogg", clip, 16000)
    good("clipped.wav", np.clip(clip * 20, -1, 1), 16000)
    nan = clip.copy()
    nan[100:110] = np.nan
    nan[200] = np.inf
    good("nan_inf.wav", nan, 16000, note="NaN/Inf", subtype="FLOAT")
    good("silent.wav", np.zeros(16000, np.float32), 16000, note="silent")

    def bad(name, reason, content=None, audio=None):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if audio is not None:
            sf.write(str(path), audio, 16000)
        else:
            path.write_bytes(content)
        expected[name] = ("failed", reason)

    bad("corrupt.wav", "cannot decode", content=os.urandom(4000))
    bad("zero_bytes.wav", "cannot decode", content=b"")
    bad("not_audio.flac", "cannot decode", content=b"this is a text file, not audio\n" * 20)
    bad("empty.wav", "empty", audio=np.zeros(0, np.float32))
    bad("too_short.wav", "too short", audio=clip[:100])
    bad("locked.wav", "permission denied", audio=clip)
    full = (root / "plain.wav").read_bytes()
    (root / "truncated.wav").write_bytes(full[: len(full) // 2])  # header promises more data than there is
    expected["truncated.wav"] = ("either", None)
    return expected


def test_every_bad_file_is_named_and_every_good_file_enhanced(tmp_path, speech, tiny_checkpoints, capsys,
                                                               monkeypatch):
    enhancer, _ = tiny_checkpoints
    root, out = tmp_path / "in", tmp_path / "out"
    expected = _bad_input_folder(root, speech)
    # Tests run as root, for whom chmod 000 does not stop reading: refuse that one file as the OS would.
    real_read = sf.read

    def read(path, *args, **kwargs):
        if str(path).endswith("locked.wav"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(sf, "read", read)
    argv = ["--input_dir", str(root), "--output_dir", str(out), "--checkpoint", str(enhancer), "--device", "cpu"]
    assert inference.main(argv) == 1
    printed = capsys.readouterr().out
    for name, (outcome, detail) in expected.items():
        # clip.flac and clip.ogg side by side keep their extension rather than overwrite each other
        output = out / (name + ".wav" if name.startswith("formats/") else os.path.splitext(name)[0] + ".wav")
        if outcome == "ok":
            assert output.is_file(), f"{name} was not enhanced:\n{printed}"
            audio, notes = load_audio(output)
            info = sf.info(str(output))
            assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
            assert abs(len(audio) - 16000) <= 1, f"{name}: {len(audio)} samples"
            if detail:
                assert any(line.startswith(f"note {name}:") and detail in line for line in printed.splitlines()), \
                    f"no note for {name}:\n{printed}"
        elif outcome == "failed":
            lines = [line for line in printed.splitlines() if line.startswith(f"failed {name}:")]
            assert len(lines) == 1 and detail in lines[0], f"{name}:\n{printed}"
            assert not output.exists()
        else:
            assert output.exists() or f"failed {name}:" in printed
    summary = printed.strip().splitlines()[-1]
    failures = sum(line.startswith("failed ") for line in printed.splitlines())
    assert summary.startswith("done ") and f"failed {failures};" in summary

    # Nothing is done twice: a second run skips every output that exists and rewrites none.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.wav")}
    assert inference.main(argv) == 1
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("done 0,") and f"skipped (already there) {len(stamps)}" in summary
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*.wav")}
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporary files behind


def test_output_folder_that_would_overwrite_inputs_is_refused(tmp_path, speech, tiny_checkpoints, capsys):
    enhancer, _ = tiny_checkpoints
    save_audio(tmp_path / "in" / "a.wav", speech[:16000])
    before = (tmp_path / "in" / "a.wav").read_bytes()
    code = inference.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "in"),
                           "--checkpoint", str(enhancer)])
    assert code == 2 and "outputs would overwrite inputs" in capsys.readouterr().err
    assert (tmp_path / "in" / "a.wav").read_bytes() == before
    # A sub-folder of the input is fine when nothing can collide: it is not read back as input either.
    nested = tmp_path / "in" / "enhanced"
    assert inference.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(nested),
                           "--checkpoint", str(enhancer), "--device", "cpu"]) == 0
    assert (nested / "a.wav").is_file() and not (nested / "enhanced").exists()


def _cli(*argv):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, capture_output=True, text=True, timeout=300)


def _assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, tiny_checkpoints):
    folder = tmp_path_factory.mktemp("cli")
    save_audio(folder / "in" / "a.wav", np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1)
    (folder / "empty").mkdir()
    (folder / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    enhancer, codec = tiny_checkpoints
    payload = torch.load(enhancer, weights_only=False)
    payload["config"]["enhancer"]["conformer"]["ff_mult"] = 3  # config no longer matches the stored weights
    torch.save(payload, folder / "mismatch.pt")
    payload = torch.load(enhancer, weights_only=False)
    payload["config"]["enhancer"]["conformer"]["colour"] = "blue"
    torch.save(payload, folder / "unknown_key.pt")
    (folder / "bad.json").write_text(json.dumps({"codec": {"train": {"learning_rat": 1e-3}}}))
    return folder


@pytest.mark.parametrize("case", ["missing_dir", "empty_dir", "missing_ckpt", "corrupt_ckpt", "wrong_stage",
                                  "shape_mismatch", "unknown_key_in_checkpoint", "cuda"])
def test_inference_argument_errors_are_one_line_exit_2(case, cli_inputs, tiny_checkpoints, tmp_path):
    enhancer, codec = tiny_checkpoints
    f = cli_inputs
    base = ["inference.py", "--output_dir", tmp_path / "out"]
    cases = {
        "missing_dir": (["--input_dir", f / "nope", "--checkpoint", enhancer], ["nope"]),
        "empty_dir": (["--input_dir", f / "empty", "--checkpoint", enhancer], ["no .wav"]),
        "missing_ckpt": (["--input_dir", f / "in", "--checkpoint", f / "absent.pt"], ["absent.pt", "not found"]),
        "corrupt_ckpt": (["--input_dir", f / "in", "--checkpoint", f / "corrupt.pt"], ["corrupt.pt", "corrupt"]),
        "wrong_stage": (["--input_dir", f / "in", "--checkpoint", codec], ["codec.pt", "'codec'"]),
        "shape_mismatch": (["--input_dir", f / "in", "--checkpoint", f / "mismatch.pt"], ["mismatch.pt"]),
        "unknown_key_in_checkpoint": (["--input_dir", f / "in", "--checkpoint", f / "unknown_key.pt"], ["colour"]),
        "cuda": (["--input_dir", f / "in", "--checkpoint", enhancer, "--device", "cuda"], ["CUDA"]),
    }
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv, words = cases[case]
    _assert_one_line_error(_cli(*base, *argv), *words)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.wav"))


def test_training_config_with_unknown_key_is_one_line_exit_2(cli_inputs, tmp_path):
    result = _cli("train.py", "--stage", "codec", "--config", cli_inputs / "bad.json", "--checkpoint_dir",
                  tmp_path / "run", "--train_dir", cli_inputs / "in")
    _assert_one_line_error(result, "codec.train.learning_rat", "learning_rate")


def _codec_argv(run_dir, data_dir, steps, config=TINY_CONFIG):
    return ["--stage", "codec", "--config", str(config), "--checkpoint_dir", str(run_dir), "--train_dir",
            str(data_dir), "--max_steps", str(steps), "--device", "cpu"]


def _config_with(tmp_path, **run):
    """The tiny config with some `run` settings changed (e.g. checkpoint_every=2)."""
    config = json.loads(TINY_CONFIG.read_text())
    config["run"].update(run)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_sigterm_saves_a_resumable_checkpoint(tmp_path, speech):
    save_audio(tmp_path / "data" / "a.wav", speech)
    run_dir = tmp_path / "killed"
    config = json.loads(TINY_CONFIG.read_text())
    config["data"]["num_workers"] = 1  # `kill` of the job signals the loader's worker too
    (tmp_path / "workers.json").write_text(json.dumps(config))
    argv = _codec_argv(run_dir, tmp_path / "data", 100000, tmp_path / "workers.json")
    process = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (run_dir / "log.csv").exists() and time.time() < deadline:  # first log line: mid-run for sure
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)  # the whole process group, as a shell's `kill %1` or Ctrl-C would
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "SIGTERM" in output
    saved = torch.load(sorted(run_dir.glob("checkpoint_*.pt"))[-1], weights_only=False)
    step = saved["step"]
    assert 0 < step < 100000

    # Restarting continues from that step: two more steps give exactly what an uninterrupted run gives.
    config = tmp_path / "workers.json"
    assert train.main(_codec_argv(run_dir, tmp_path / "data", step + 2, config)) == 0
    assert train.main(_codec_argv(tmp_path / "straight", tmp_path / "data", step + 2, config)) == 0
    resumed = torch.load(sorted(run_dir.glob("checkpoint_*.pt"))[-1], weights_only=False)
    straight = torch.load(sorted((tmp_path / "straight").glob("checkpoint_*.pt"))[-1], weights_only=False)
    assert resumed["step"] == straight["step"] == step + 2
    for key in ("model", "discriminator"):
        assert all(torch.equal(v, resumed[key][k]) for k, v in straight[key].items())
    for key in ("optimizer_g", "optimizer_d"):
        a, b = straight[key]["state"], resumed[key]["state"]
        assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, speech, caplog):
    save_audio(tmp_path / "data" / "a.wav", speech)
    run_dir, config = tmp_path / "run", _config_with(tmp_path, checkpoint_every=2)
    assert train.main(_codec_argv(run_dir, tmp_path / "data", 4, config)) == 0  # checkpoints at 2 and 4
    newest = run_dir / "checkpoint_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with caplog.at_level("INFO"):
        assert train.main(_codec_argv(run_dir, tmp_path / "data", 5, config)) == 0
    assert any("checkpoint_00000004.pt" in r.message and "corrupt" in r.message for r in caplog.records)
    assert any("resuming from" in r.message and "checkpoint_00000002.pt" in r.message for r in caplog.records)
    assert torch.load(sorted(run_dir.glob("checkpoint_*.pt"))[-1], weights_only=False)["step"] == 5


def test_nonfinite_losses_are_skipped_then_stop_training(tmp_path, speech, monkeypatch, capsys):
    save_audio(tmp_path / "data" / "a.wav", speech)
    config = json.loads(TINY_CONFIG.read_text())
    config["run"]["max_nonfinite_steps"] = 3
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(config))
    monkeypatch.setattr(train.F, "mse_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    argv = _codec_argv(tmp_path / "run", tmp_path / "data", 50)
    argv[argv.index(str(TINY_CONFIG))] = str(path)
    assert train.main(argv) == 1
    assert "3 non-finite losses in a row" in capsys.readouterr().err


def test_keep_last_prunes_old_checkpoints(tmp_path, speech):
    save_audio(tmp_path / "data" / "a.wav", speech)
    config = _config_with(tmp_path, checkpoint_every=2)
    assert train.main(_codec_argv(tmp_path / "run", tmp_path / "data", 7, config) + ["--keep_last", "2"]) == 0
    assert [p.name for p in sorted((tmp_path / "run").glob("checkpoint_*.pt"))] == [
        "checkpoint_00000006.pt", "checkpoint_00000007.pt"]
