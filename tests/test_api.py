"""The Python API a notebook user reaches for: Enhancer.load() and enhancer(audio, sample_rate)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soxr
import torch

from conftest import EXAMPLES, REPO
from inference import Enhancer
from utils import AudioError, stft


@pytest.fixture(scope="module")
def enhancer() -> Enhancer:
    return Enhancer.load(device="cpu")


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    import soundfile as sf

    return sf.read(EXAMPLES / "degraded" / "noise" / "allison_vm_helpexit.wav", dtype="float32")[0]


def log_spectrum(audio: np.ndarray) -> np.ndarray:
    return torch.log(stft(torch.from_numpy(audio), 512, 128, 512).abs() + 1e-5).flatten().numpy()


def test_any_dtype_layout_and_rate_gives_the_same_enhancement_as_float32_mono_16k(enhancer: Enhancer,
                                                                                clip: np.ndarray) -> None:
    reference, notes = enhancer(clip, 16000)
    assert reference.dtype == np.float32 and reference.shape == clip.shape and not notes
    as_float64, _ = enhancer(clip.astype(np.float64), 16000)
    assert np.allclose(as_float64, reference, atol=1e-4)
    as_int16, _ = enhancer(torch.from_numpy(np.round(clip * 32767).astype(np.int16)), 16000)
    # int16 rounds the input (noise at -96 dBFS, raised with the clip to the model's level): a token or two may flip,
    # and Griffin-Lim then finds another phase for those frames, so the spectra are compared, not the waveforms.
    assert np.corrcoef(log_spectrum(as_int16), log_spectrum(reference))[0, 1] > 0.97
    stereo = np.stack([clip, clip])  # (channels, samples), as torch audio code has it
    out, notes = enhancer(stereo, 16000)
    assert notes == ["mixed 2 channels to mono"] and np.allclose(out, reference, atol=1e-4)
    out, notes = enhancer(torch.from_numpy(stereo.T.copy()), 16000)  # (samples, channels), as soundfile has it
    assert notes == ["mixed 2 channels to mono"] and np.allclose(out, reference, atol=1e-4)
    at_44k = soxr.resample(clip, 16000, 44100)
    out, notes = enhancer(at_44k, 44100)
    assert notes == ["resampled 44100→16000"] and abs(out.shape[0] - clip.shape[0]) <= 1


def test_nan_samples_are_zeroed_with_a_note_and_bad_audio_is_one_line(enhancer: Enhancer, clip: np.ndarray) -> None:
    broken = clip.copy()
    broken[1000:1100] = np.nan
    out, notes = enhancer(broken, 16000)
    assert np.isfinite(out).all() and notes == ["replaced 100 NaN/Inf samples with 0"]
    for audio, rate, words in ((np.zeros(0, np.float32), 16000, "empty"), (clip[:100], 16000, "too short"),
                               (np.zeros((2, 3, 4), np.float32), 16000, "shape"), (clip, 0, "sample rate"),
                               (clip.astype(np.complex64), 16000, "complex"),
                               ((clip * 32767).astype(np.int64), 16000, "int64"), (clip * 1e30, 16000, "full scale")):
        with pytest.raises(AudioError, match=words):
            enhancer(audio, rate)
    out, _ = enhancer(torch.from_numpy(clip).bfloat16(), 16000)  # numpy has no bfloat16: converted first
    assert out.shape == clip.shape


def test_a_dropout_in_a_noisy_recording_stays_silent_and_leaves_the_rest_as_it_was(enhancer: Enhancer,
                                                                                   clip: np.ndarray) -> None:
    """62 ms of digital silence inside noise (a lost packet, a glitch) once made the whole output 3x as loud."""
    reference, _ = enhancer(clip, 16000)
    broken = clip.copy()
    broken[30000:31000] = 0.0
    out, notes = enhancer(broken, 16000)
    assert notes == ["62 ms of digital silence (dropouts) filled with noise at the recording's floor for the model; "
                     "silent in the output"]
    assert not out[30000:31000].any()
    outside = np.r_[0:29000, 32000:len(clip)]
    level = np.sqrt(np.mean(out[outside] ** 2) / np.mean(reference[outside] ** 2))
    assert 0.95 < level < 1.05


def test_quiet_loud_and_offset_recordings_are_enhanced_alike(enhancer: Enhancer) -> None:
    """The codec's tokens depend on level: the input is brought to one level (DC removed) and the output given the
    input's level back, so a recording at -40, -20 or 0 dB, or with a DC offset, comes out the same up to level."""
    from metrics import score_pair
    from utils import load_audio

    clean = load_audio(EXAMPLES / "clean" / "allison_dir_firstlast.wav", 16000)[0]
    scores = {}
    for db, offset in ((0, 0.0), (-20, 0.0), (-40, 0.0), (0, 0.2)):
        scale = 10 ** (db / 20)
        out, notes = enhancer(clean * scale + offset, 16000)
        assert abs(float(out.mean())) < 1e-3, "no DC offset in the output"
        assert ("removed a DC offset of +0.200" in notes) == (offset != 0)
        assert 0.5 < np.std(out) / np.std(clean * scale) < 2.0, "the output keeps the input's level"
        scores[(db, offset)] = score_pair(out / scale, clean, dnsmos=False)
    reference = scores[(0, 0.0)]
    assert reference["pesq"] > 2.0 and reference["estoi"] > 0.85
    for key, score in scores.items():
        assert abs(score["pesq"] - reference["pesq"]) < 0.3 and abs(score["estoi"] - reference["estoi"]) < 0.03, key


def test_the_readme_example_runs(tmp_path: Path) -> None:
    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S).group(1)
    script = block.replace('"examples/', f'"{EXAMPLES}/')
    done = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})\n{script}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "enhanced.wav").is_file()
