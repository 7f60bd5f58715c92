"""Bad input, wrong arguments and interrupted runs: a clear line for each, nothing lost, nothing done twice."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import checkpoint
import inference
import train
from conftest import REPO, TINY_CONFIG, latest_checkpoint, write_config
from models import build_codec, build_enhancer
from utils import load_audio, load_config, save_audio, seed_everything


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random-weight tiny ParaGSE checkpoint (carrying its codec) and the bare codec checkpoint."""
    folder = tmp_path_factory.mktemp("ckpt")
    config = load_config(TINY_CONFIG)
    seed_everything(0)
    codec = build_codec(config["codec"], config["sample_rate"])
    model = build_enhancer(config["enhancer"], codec)
    codec_payload = checkpoint.codec_payload(codec)
    checkpoint.save(folder / "enhancer.pt", checkpoint.enhancer_payload(model, codec_payload, config["inference"]))
    checkpoint.save(folder / "codec.pt", codec_payload)
    return folder / "enhancer.pt", folder / "codec.pt"


def _write(path: Path, audio: np.ndarray, rate: int, **kwargs: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate, **kwargs)


def _bad_input_folder(root: Path, speech: np.ndarray) -> dict[str, tuple[str, str | None]]:
    """One file of every awkward kind; returns {relative name: expected outcome}."""
    import soxr

    clip = speech[:16000]
    expected = {}

    def good(name: str, audio: np.ndarray, rate: int, note: str | None = None, **kwargs: str) -> None:
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
    good("formats/clip.mp3", clip, 16000)
    good("clipped.wav", np.clip(clip * 20, -1, 1), 16000)
    nan = clip.copy()
    nan[100:110] = np.nan
    nan[200] = np.inf
    good("nan_inf.wav", nan, 16000, note="NaN/Inf", subtype="FLOAT")
    good("silent.wav", np.zeros(16000, np.float32), 16000, note="silent")

    def bad(name: str, reason: str, content: bytes | None = None, audio: np.ndarray | None = None) -> None:
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
    (root / "dangling.wav").symlink_to(root / "moved_away.wav")  # a link whose file is gone
    expected["dangling.wav"] = ("failed", "a link to a missing file")
    full = (root / "plain.wav").read_bytes()
    (root / "truncated.wav").write_bytes(full[: len(full) // 2])  # header promises more data than there is
    expected["truncated.wav"] = ("either", None)
    # A recorder killed before it wrote the final size: the header gives half the samples the file holds.
    short_header = bytearray(full)
    data = short_header.find(b"data")
    short_header[data + 4: data + 8] = (16000).to_bytes(4, "little")  # bytes of 8,000 PCM-16 samples
    (root / "short_header.wav").write_bytes(bytes(short_header))
    expected["short_header.wav"] = ("ok", "the WAV header gives 8000 samples but the file holds 16000")
    return expected


def test_every_bad_file_is_named_and_every_good_file_enhanced(
        tmp_path: Path, speech: np.ndarray, tiny_checkpoints: tuple[Path, Path], capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder of awkward files (any rate, channels, format, NaNs, silence; empty, corrupt, too short, unreadable):
    every usable one is enhanced to 16 kHz mono PCM-16 of its length with a note of what was changed, every other
    one is named with its reason, the exit code is 1, and a second run redoes nothing."""
    enhancer, _ = tiny_checkpoints
    root, out = tmp_path / "in", tmp_path / "out"
    expected = _bad_input_folder(root, speech)
    # Tests run as root, for whom chmod 000 does not stop reading: refuse that one file as the OS would.
    real_read = sf.read

    def read(path: str, *args, **kwargs) -> tuple[np.ndarray, int]:
        if str(path).endswith("locked.wav"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(sf, "read", read)
    argv = ["--input_dir", str(root), "--output_dir", str(out), "--checkpoint", str(enhancer), "--device", "cpu"]
    assert inference.main(argv) == 1
    printed = capsys.readouterr().out
    for name, (outcome, detail) in expected.items():
        # clip.flac, clip.ogg and clip.mp3 side by side keep their extension rather than overwrite each other
        output = out / (name + ".wav" if name.startswith("formats/") else os.path.splitext(name)[0] + ".wav")
        if outcome == "ok":
            assert output.is_file(), f"{name} was not enhanced:\n{printed}"
            audio, notes = load_audio(output, 16000)
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


def test_output_folder_that_would_overwrite_inputs_is_refused(tmp_path: Path, speech: np.ndarray,
                                                              tiny_checkpoints: tuple[Path, Path],
                                                              capsys: pytest.CaptureFixture) -> None:
    """Writing outputs over the inputs is refused in one line; a sub-folder of the input is fine and not read back."""
    enhancer, _ = tiny_checkpoints
    save_audio(tmp_path / "in" / "a.wav", speech[:16000], 16000)
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


def _cli(*argv: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, capture_output=True, text=True, timeout=300)


def _assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


class _RunsCode:
    """Unpickling it would create the folder `marker`: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.marker),)


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: tuple[Path, Path]) -> Path:
    """A folder of broken inputs for the command-line tools: audio, an empty folder, bad checkpoints and configs."""
    folder = tmp_path_factory.mktemp("cli")
    noise = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    save_audio(folder / "in" / "a.wav", noise, 16000)
    (folder / "empty").mkdir()
    (folder / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    enhancer, codec = tiny_checkpoints
    payload = checkpoint.load(enhancer)
    payload["config"]["conformer"]["ff_mult"] = 3  # config no longer matches the stored weights
    checkpoint.save(folder / "mismatch.pt", payload)
    payload = checkpoint.load(enhancer)
    payload["config"]["conformer"]["colour"] = "blue"
    checkpoint.save(folder / "unknown_key.pt", payload)
    torch.save(checkpoint.load(enhancer) | {"extra": _RunsCode(folder / "code_ran")}, folder / "unsafe.pt")
    write_config(folder / "typo.json", {"codec_training": {"learning_rat": 1e-3}})
    # "class" switches the section to another codec, whose keys are checked when it is built
    write_config(folder / "switched.json", {"codec": {"class": "MelCodec", "mdct": {"frame_length": 80,
                                                                                   "hop_length": 40}}})
    nested = load_config(REPO / "configs" / "demo_codec.json")["codec"]
    nested["quantizer"]["projection"] = False
    write_config(folder / "switched_nested.json", {"codec": nested})
    return folder


@pytest.mark.parametrize("case", ["missing_dir", "empty_dir", "missing_ckpt", "corrupt_ckpt", "unsafe_ckpt",
                                  "wrong_kind", "shape_mismatch", "unknown_key_in_checkpoint", "cuda"])
def test_inference_argument_errors_are_one_line_exit_2(case: str, cli_inputs: Path,
                                                       tiny_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    """Each wrong argument or bad checkpoint is one line naming it, exit code 2, and no output; a checkpoint whose
    loading would run code is refused without running it."""
    enhancer, codec = tiny_checkpoints
    f = cli_inputs
    base = ["inference.py", "--output_dir", tmp_path / "out"]
    cases = {
        "missing_dir": (["--input_dir", f / "nope", "--checkpoint", enhancer], ["nope"]),
        "empty_dir": (["--input_dir", f / "empty", "--checkpoint", enhancer], ["no .wav"]),
        "missing_ckpt": (["--input_dir", f / "in", "--checkpoint", f / "absent.pt"], ["absent.pt", "not found"]),
        "corrupt_ckpt": (["--input_dir", f / "in", "--checkpoint", f / "corrupt.pt"], ["corrupt.pt", "corrupt"]),
        "unsafe_ckpt": (["--input_dir", f / "in", "--checkpoint", f / "unsafe.pt"], ["unsafe.pt", "not safe"]),
        "wrong_kind": (["--input_dir", f / "in", "--checkpoint", codec], ["codec.pt", "kind 'codec'"]),
        "shape_mismatch": (["--input_dir", f / "in", "--checkpoint", f / "mismatch.pt"], ["mismatch.pt"]),
        "unknown_key_in_checkpoint": (["--input_dir", f / "in", "--checkpoint", f / "unknown_key.pt"], ["colour"]),
        "cuda": (["--input_dir", f / "in", "--checkpoint", enhancer, "--device", "cuda"], ["CUDA"]),
    }
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv, words = cases[case]
    _assert_one_line_error(_cli(*base, *argv), *words)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.wav"))
    assert not (f / "code_ran").exists()


@pytest.mark.parametrize("config, words", [
    ("typo.json", ["codec_training.learning_rat", "learning_rate"]),
    ("switched.json", ["codec.mdct", "MelCodec"]),
    ("switched_nested.json", ["codec", "projection"]),
], ids=["typo", "key_of_the_other_class", "nested_key_of_the_other_class"])
def test_training_config_with_unknown_key_is_one_line_exit_2(cli_inputs: Path, tmp_path: Path, config: str,
                                                             words: list[str]) -> None:
    """A config key that neither the defaults nor (after a "class" switch) the chosen class takes: one line naming
    it, exit code 2, no checkpoint."""
    result = _cli("train.py", "--stage", "codec", "--config", cli_inputs / config, "--checkpoint_dir",
                  tmp_path / "run", "--train_dir", cli_inputs / "in")
    _assert_one_line_error(result, *words)
    assert not list((tmp_path / "run").glob("*.pt"))


def _codec_argv(run_dir: Path, data_dir: Path, steps: int, config: Path = TINY_CONFIG) -> list[str]:
    """Train the codec on CPU with one thread (in this process or another: the same arithmetic)."""
    return ["--stage", "codec", "--config", str(config), "--checkpoint_dir", str(run_dir), "--train_dir",
            str(data_dir), "--max_steps", str(steps), "--device", "cpu", "--threads", "1"]


def _config_with(tmp_path: Path, **run: int) -> Path:
    """The tiny config with some `run` settings changed (e.g. checkpoint_every=2)."""
    return write_config(tmp_path / "config.json", {"base": "tiny.json", "run": run})


def test_sigterm_saves_a_resumable_checkpoint(tmp_path: Path, speech: np.ndarray) -> None:
    """SIGTERM to the whole job (data workers included) mid-run: a checkpoint is saved, the exit is clean, and
    resuming gives exactly what an uninterrupted run gives."""
    save_audio(tmp_path / "data" / "a.wav", speech, 16000)
    run_dir = tmp_path / "killed"
    config = write_config(tmp_path / "workers.json",  # `kill` of the job signals the loader's worker too
                          {"base": "tiny.json", "data": {"num_workers": 1}})
    argv = _codec_argv(run_dir, tmp_path / "data", 100000, config)
    process = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (run_dir / "log.csv").exists() and time.time() < deadline:  # first log line: mid-run for sure
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)  # the whole process group, as a shell's `kill %1` or Ctrl-C would
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "SIGTERM" in output
    step = checkpoint.load(latest_checkpoint(run_dir))["training"]["step"]
    assert 0 < step < 100000

    # Restarting continues from that step: two more steps give exactly what an uninterrupted run gives.
    assert train.main(_codec_argv(run_dir, tmp_path / "data", step + 2, config)) == 0
    assert train.main(_codec_argv(tmp_path / "straight", tmp_path / "data", step + 2, config)) == 0
    resumed = checkpoint.load(latest_checkpoint(run_dir))
    straight = checkpoint.load(latest_checkpoint(tmp_path / "straight"))
    assert resumed["training"]["step"] == straight["training"]["step"] == step + 2
    assert all(torch.equal(v, resumed["model"][k]) for k, v in straight["model"].items())
    discriminator = resumed["training"]["discriminator"]
    assert all(torch.equal(v, discriminator[k]) for k, v in straight["training"]["discriminator"].items())
    for name in ("generator", "discriminator"):
        a = straight["training"]["optimizers"][name]["state"]
        b = resumed["training"]["optimizers"][name]["state"]
        assert a and all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, speech: np.ndarray,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A truncated newest checkpoint is skipped with a warning naming it; the run resumes from the one before."""
    save_audio(tmp_path / "data" / "a.wav", speech, 16000)
    run_dir, config = tmp_path / "run", _config_with(tmp_path, checkpoint_every=2)
    assert train.main(_codec_argv(run_dir, tmp_path / "data", 4, config)) == 0  # checkpoints at 2 and 4
    newest = run_dir / "checkpoint_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with caplog.at_level("INFO"):
        assert train.main(_codec_argv(run_dir, tmp_path / "data", 5, config)) == 0
    assert any("checkpoint_00000004.pt" in r.message and "corrupt" in r.message for r in caplog.records)
    assert any("resuming from" in r.message and "checkpoint_00000002.pt" in r.message for r in caplog.records)
    assert checkpoint.load(latest_checkpoint(run_dir))["training"]["step"] == 5


def test_nonfinite_losses_are_skipped_then_stop_training(tmp_path: Path, speech: np.ndarray,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Non-finite losses are skipped; run.max_nonfinite_steps of them in a row stop training with exit code 1."""
    save_audio(tmp_path / "data" / "a.wav", speech, 16000)
    config = write_config(tmp_path / "nan.json", {"base": "tiny.json", "run": {"max_nonfinite_steps": 3}})
    monkeypatch.setattr(train.F, "mse_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    assert train.main(_codec_argv(tmp_path / "run", tmp_path / "data", 50, config)) == 1
    assert "3 non-finite losses or gradients in a row" in capsys.readouterr().err


def test_keep_last_prunes_old_checkpoints(tmp_path: Path, speech: np.ndarray) -> None:
    """--keep_last N keeps the N newest checkpoints of a run."""
    save_audio(tmp_path / "data" / "a.wav", speech, 16000)
    config = _config_with(tmp_path, checkpoint_every=2)
    assert train.main(_codec_argv(tmp_path / "run", tmp_path / "data", 7, config) + ["--keep_last", "2"]) == 0
    assert [p.name for p in sorted((tmp_path / "run").glob("checkpoint_*.pt"))] == [
        "checkpoint_00000006.pt", "checkpoint_00000007.pt"]


def test_keep_last_zero_keeps_every_checkpoint_and_a_negative_count_is_refused(tmp_path: Path,
                                                                                 speech: np.ndarray) -> None:
    save_audio(tmp_path / "data" / "a.wav", speech, 16000)
    config = _config_with(tmp_path, checkpoint_every=2)
    assert train.main(_codec_argv(tmp_path / "all", tmp_path / "data", 5, config) + ["--keep_last", "0"]) == 0
    assert [p.name for p in sorted((tmp_path / "all").glob("checkpoint_*.pt"))] == [
        "checkpoint_00000002.pt", "checkpoint_00000004.pt", "checkpoint_00000005.pt"]
    assert train.main(_codec_argv(tmp_path / "none", tmp_path / "data", 3, config) + ["--keep_last", "-1"]) == 2
    assert not list((tmp_path / "none").glob("checkpoint_*.pt"))


def test_a_run_in_another_models_checkpoint_folder_is_refused_and_changes_nothing(
        tmp_path: Path, speech: np.ndarray, capfd: pytest.CaptureFixture) -> None:
    """An enhancer started in its codec's run folder would prune the codec's checkpoints and rewind its log."""
    save_audio(tmp_path / "data" / "a.wav", speech, 16000)
    run = tmp_path / "run"
    assert train.main(_codec_argv(run, tmp_path / "data", 3, _config_with(tmp_path, log_every=1))) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capfd.readouterr()
    code = train.main(["--stage", "enhancer", "--config", str(TINY_CONFIG), "--codec",
                       str(run / "checkpoint_00000003.pt"), "--checkpoint_dir", str(run), "--train_degraded_dir",
                       str(tmp_path / "data"), "--train_clean_dir", str(tmp_path / "data"), "--max_steps", "2"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "MDCTCodec run" in err[0] and "ParaGSE" in err[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("tool", ["inference", "train"])
@pytest.mark.parametrize("threads", ["0", "-1"])
def test_a_thread_count_below_one_is_refused(tool: str, threads: str, tmp_path: Path,
                                             capfd: pytest.CaptureFixture) -> None:
    argv = (["--input_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")] if tool == "inference" else
            ["--stage", "codec", "--checkpoint_dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_info:
        (inference if tool == "inference" else train).main(argv + ["--threads", threads])
    assert exit_info.value.code == 2 and "--threads must be at least 1" in capfd.readouterr().err


def test_weights_that_turn_non_finite_stop_training_and_are_never_saved(tmp_path: Path, speech: np.ndarray,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capfd: pytest.CaptureFixture) -> None:
    """An optimiser step that leaves a weight non-finite (what a far too high learning rate does) stops the run
    with exit code 1 at once; the checkpoints written before it are all it leaves, all finite."""
    save_audio(tmp_path / "data" / "a.wav", speech, 16000)
    config = write_config(tmp_path / "every.json", {"base": "tiny.json", "run": {"checkpoint_every": 1}})
    step = torch.optim.AdamW.step

    def step_that_breaks_at_the_third_call(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_that_breaks_at_the_third_call)
    capfd.readouterr()
    assert train.main(_codec_argv(tmp_path / "run", tmp_path / "data", 10, config)) == 1
    error = capfd.readouterr().err
    assert "no longer finite after step" in error
    broken_at = int(error.split("after step ")[1].split(":")[0])
    saved = sorted(p.name for p in (tmp_path / "run").glob("checkpoint_*.pt"))
    assert saved == [f"checkpoint_{step:08d}.pt" for step in range(1, broken_at)]  # every step before, none after
    for name in saved:
        model = checkpoint.load(tmp_path / "run" / name)["model"]
        assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point()), name


def test_a_resume_may_change_only_how_the_run_logs_saves_and_stops(tmp_path: Path, speech: np.ndarray,
                                                                   capfd: pytest.CaptureFixture) -> None:
    """A learning rate, batch size or seed changed on resume would mix two recipes: refused by name, nothing
    touched. Logging and checkpoint cadence may change, and the stored config then says what the run now uses."""
    save_audio(tmp_path / "data" / "a.wav", speech, 16000)
    run = tmp_path / "run"
    assert train.main(_codec_argv(run, tmp_path / "data", 2)) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    changed = write_config(tmp_path / "changed.json", {"base": "tiny.json", "codec_training": {"learning_rate": 1e-4,
                                                                                               "batch_size": 2},
                                                      "data": {"seed": 7}})
    capfd.readouterr()
    assert train.main(_codec_argv(run, tmp_path / "data", 4, changed)) == 2
    error = capfd.readouterr().err.strip().splitlines()
    assert len(error) == 1 and all(key in error[0] for key in ("codec_training.batch_size",
                                                                "codec_training.learning_rate", "data.seed")), error
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    cadence = write_config(tmp_path / "cadence.json", {"base": "tiny.json", "run": {"log_every": 1}})
    assert train.main(_codec_argv(run, tmp_path / "data", 4, cadence)) == 0
    stored = checkpoint.load(run / "checkpoint_00000004.pt")["training"]["config"]
    assert stored["run"]["log_every"] == 1


def test_a_checkpoint_write_killed_midway_leaves_nothing_behind_on_the_next_start(tmp_path: Path,
                                                                                   speech: np.ndarray) -> None:
    save_audio(tmp_path / "data" / "a.wav", speech, 16000)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".checkpoint_00000002.pt.k3j2.tmp").write_bytes(b"half a checkpoint")
    assert train.main(_codec_argv(run, tmp_path / "data", 1)) == 0
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == ["checkpoint_00000001.pt"]


def test_ctrl_c_mid_folder_prints_the_summary_not_a_traceback(tmp_path: Path, speech: np.ndarray) -> None:
    for i in range(40):
        save_audio(tmp_path / "in" / f"{i:02d}.wav", speech[: 16000 * 2], 16000)
    process = subprocess.Popen([sys.executable, str(REPO / "inference.py"), "--input_dir", str(tmp_path / "in"),
                                "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "out").glob("*.wav")) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and out.strip().splitlines()[-1].startswith("done ")
    written = list((tmp_path / "out").glob("*.wav"))
    assert 0 < len(written) < 40 and all(load_audio(p, 16000)[0].shape[0] == 32000 for p in written)


@pytest.mark.parametrize("override, words", [
    ({"codec_training": {"segment_length": -5}}, "codec_training.segment_length"),
    ({"codec_training": {"segment_length": 3960}}, "token-aligned length, e.g. 4120"),
    ({"codec_training": {"learning_rate": -1e-3}}, "codec_training.learning_rate"),
    ({"codec_training": {"betas": [0.9]}}, "codec_training.betas"),
    ({"run": {"checkpoint_every": 0}}, "run.checkpoint_every"),
])
def test_training_settings_that_cannot_work_are_one_line_exit_2(override: dict, words: str, tmp_path: Path,
                                                               speech: np.ndarray,
                                                               capfd: pytest.CaptureFixture) -> None:
    save_audio(tmp_path / "data" / "a.wav", speech, 16000)
    config = write_config(tmp_path / "bad.json", {"base": "tiny.json", **override})
    capfd.readouterr()
    assert train.main(_codec_argv(tmp_path / "run", tmp_path / "data", 2, config)) == 2
    error = capfd.readouterr().err.strip().splitlines()
    assert len(error) == 1 and words in error[0], error
    assert not list((tmp_path / "run").glob("checkpoint_*.pt"))


def test_a_checkpoint_folder_that_is_a_file_and_a_negative_step_count_are_one_line_exit_2(
        tmp_path: Path, speech: np.ndarray, capfd: pytest.CaptureFixture) -> None:
    save_audio(tmp_path / "data" / "a.wav", speech, 16000)
    (tmp_path / "a_file").write_text("not a folder")
    for argv, words in ((_codec_argv(tmp_path / "a_file", tmp_path / "data", 2), "is a file, not a folder"),
                        (_codec_argv(tmp_path / "run", tmp_path / "data", -1), "--max_steps must be 0 or more")):
        capfd.readouterr()
        assert train.main(argv) == 2
        error = capfd.readouterr().err.strip().splitlines()
        assert len(error) == 1 and words in error[0], error
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_one_file_as_input_and_reruns_that_would_mix_settings(tmp_path: Path, speech: np.ndarray,
                                                              tiny_checkpoints: tuple[Path, Path],
                                                              capfd: pytest.CaptureFixture) -> None:
    """A single file is a valid input; a rerun that asks for tokens writes them; a rerun with another decoding is
    refused before any compute, since it would keep the outputs of the first; --overwrite redoes them."""
    enhancer, _ = tiny_checkpoints
    save_audio(tmp_path / "in" / "a.wav", speech[:16000], 16000)
    argv = ["--input_dir", str(tmp_path / "in" / "a.wav"), "--output_dir", str(tmp_path / "out"), "--checkpoint",
            str(enhancer), "--device", "cpu"]
    assert inference.main(argv) == 0 and (tmp_path / "out" / "a.wav").is_file()
    assert inference.main(argv + ["--save_tokens"]) == 0 and (tmp_path / "out" / "a.tokens.npy").is_file()
    capfd.readouterr()
    assert inference.main(argv + ["--decoding", "expected"]) == 2
    error = capfd.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "decoding argmax → expected" in error[0] and "--overwrite" in error[0], error
    assert inference.main(argv + ["--decoding", "expected", "--overwrite"]) == 0


def test_an_export_onto_its_own_source_and_an_unreadable_settings_note_are_one_line(
        tmp_path: Path, speech: np.ndarray, tiny_checkpoints: tuple[Path, Path], capfd: pytest.CaptureFixture) -> None:
    enhancer, _ = tiny_checkpoints
    before = enhancer.read_bytes()
    assert checkpoint.main(["export", str(enhancer), str(enhancer), "--decoding", "argmax"]) == 2
    error = capfd.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is the checkpoint it would be made from" in error[0] and enhancer.read_bytes() == before
    save_audio(tmp_path / "in" / "a.wav", speech[:16000], 16000)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / inference.SETTINGS_FILE).write_text("{not json")
    argv = ["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--checkpoint", str(enhancer),
            "--device", "cpu"]
    assert inference.main(argv) == 2
    error = capfd.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is not readable" in error[0] and "--overwrite" in error[0], error
    assert inference.main(argv + ["--overwrite"]) == 0


def test_outputs_that_cannot_be_written_are_refused_before_any_compute(tmp_path: Path, speech: np.ndarray,
                                                                         tiny_checkpoints: tuple[Path, Path]) -> None:
    """An output folder that cannot be made (here: below a file) is one line, exit 2, before the model loads or a
    score is computed; evaluate.py's --output likewise."""
    enhancer, _ = tiny_checkpoints
    save_audio(tmp_path / "in" / "a.wav", speech[:16000], 16000)
    (tmp_path / "a_file").write_text("not a folder")
    blocked = tmp_path / "a_file" / "out"
    _assert_one_line_error(_cli("inference.py", "--input_dir", tmp_path / "in", "--output_dir", blocked,
                                "--checkpoint", enhancer), "--output_dir", "cannot write", str(blocked))
    _assert_one_line_error(_cli("evaluate.py", "--enhanced_dir", tmp_path / "in", "--clean_dir", tmp_path / "in",
                                "--output", blocked / "scores.csv", "--no_dnsmos"), "--output", "cannot write")
    _assert_one_line_error(_cli("evaluate.py", "--enhanced_dir", tmp_path / "in", "--clean_dir", tmp_path / "in",
                                "--output", tmp_path / "in", "--no_dnsmos"), "is a folder")


def test_a_file_that_cannot_be_written_is_named_and_the_rest_go_on(tmp_path: Path, speech: np.ndarray,
                                                                   tiny_checkpoints: tuple[Path, Path],
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capfd: pytest.CaptureFixture) -> None:
    """A write error mid-folder (libsndfile's own error, as a full disk gives) fails that file with one line naming
    it; the other files are written, nothing partial is left, exit code 1."""
    enhancer, _ = tiny_checkpoints
    for name in ("a", "b", "c"):
        save_audio(tmp_path / "in" / f"{name}.wav", speech[:16000], 16000)
    real_write = sf.write

    def full_disk_for_b(file: str, *args: object, **kwargs: object) -> None:
        if Path(file).name.startswith(".b.wav."):
            raise sf.LibsndfileError(0, prefix="Error writing: ")
        real_write(file, *args, **kwargs)

    monkeypatch.setattr(sf, "write", full_disk_for_b)
    argv = ["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--checkpoint", str(enhancer),
            "--device", "cpu"]
    assert inference.main(argv) == 1
    out = capfd.readouterr().out
    failures = [line for line in out.splitlines() if line.startswith("failed")]
    assert len(failures) == 1 and "b.wav" in failures[0] and "cannot write" in failures[0], out
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".paragse")) == ["a.wav",
                                                                                                           "c.wav"]
