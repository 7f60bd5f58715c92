"""The distortions of the paper: additive noise at a chosen SNR, reverberation (simulated shoebox-room impulse
responses), band-limiting, clipping and their mixture, drawn at random by `degrade`.

Shapes: every waveform is a 1-D float32 array of samples (mono), at 16 kHz unless a `sample_rate` says otherwise.

Determinism: no function here touches a global random state; every draw comes from the np.random.Generator passed
in (pyroomacoustics' own generators are seeded from it). Every distortion range and probability comes from the
config's "data.degradation" section. Loading noise and RIR files into an AudioBank is dataset.load_bank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import soxr
from scipy.signal import fftconvolve

from utils import UserError

CONDITIONS = ("noise", "reverb", "bandlimit", "clipping", "mixture")
"""Degradation names; also the folder names of the test sets and examples/degraded/."""


# ================================================================================================ distortions
def signal_power(x: np.ndarray) -> float:
    """Mean square of `x`, computed in float64 so long signals keep their precision."""
    return float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0


def loop_to_length(noise: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """`length` samples of `noise` from a random offset, wrapping around (so short noises loop)."""
    if noise.size == 0:
        raise ValueError("noise signal is empty")
    start = int(rng.integers(0, noise.size))
    return np.take(noise, np.arange(start, start + length), mode="wrap")


def _audible_noise_segment(noise: np.ndarray, length: int, rng: np.random.Generator,
                           min_relative_power_db: float, tries: int = 10) -> np.ndarray:
    """A looped/cropped noise segment that is not one of the file's near-silent stretches.

    Sparse noises (a bark, then silence) would otherwise have their silence scaled up to the target SNR,
    turning dither into loud hiss. Up to `tries` offsets; the first loud enough wins, else the loudest.
    """
    floor = signal_power(noise) * 10.0 ** (min_relative_power_db / 10.0)
    best, best_power = None, -1.0
    for _ in range(tries):
        segment = loop_to_length(noise, length, rng).astype(np.float64)
        power = signal_power(segment)
        if power >= floor:
            return segment
        if power > best_power:
            best, best_power = segment, power
    return best


def add_noise(clean: np.ndarray, noise: np.ndarray, snr_db: float, rng: np.random.Generator,
              min_relative_power_db: float = -30.0) -> np.ndarray:
    """clean + noise (looped/cropped at a random offset), the noise scaled so the SNR is exactly `snr_db`.

    (T,) + (any length) -> (T,). The offset avoids stretches more than `min_relative_power_db` below the noise
    file's mean power. A clean signal of zero power gets no noise (its SNR is undefined).
    """
    if signal_power(noise) == 0.0:
        raise ValueError("noise signal is silent (zero power)")
    segment = _audible_noise_segment(noise, clean.size, rng, min_relative_power_db)
    noise_power = signal_power(segment)
    if noise_power == 0.0:
        raise ValueError("noise signal is silent over every offset tried")
    gain = math.sqrt(signal_power(clean) / (noise_power * 10.0 ** (snr_db / 10.0)))
    return (clean.astype(np.float64) + gain * segment).astype(np.float32)


def change_speed(clean: np.ndarray, factor: float, sample_rate: int) -> np.ndarray:
    """`clean` played `factor` times as fast: tempo and pitch (so formants, a voice's size) move together.

    Returns about len(clean) / factor samples. Training speech is resampled like this to stand for voices of other
    sizes: the speakers a small corpus lacks.
    """
    if factor == 1.0:
        return clean.astype(np.float32)
    return soxr.resample(clean.astype(np.float32), sample_rate * factor, sample_rate, quality="HQ")


def draw_speed_factor(rng: np.random.Generator, config: dict) -> float:
    """1.0, or with probability config["p_speed_change"] a factor uniform in config["speed_factor"]."""
    if float(config["p_speed_change"]) <= 0.0 or rng.random() >= float(config["p_speed_change"]):
        return 1.0
    return _uniform(rng, config["speed_factor"])


def reverberate(clean: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """clean * rir, the first len(clean) samples, rescaled to the power of `clean`. (T,), (L,) -> (T,)."""
    wet = fftconvolve(clean.astype(np.float64), rir.astype(np.float64))[: clean.size]
    wet_power = signal_power(wet)
    if wet_power == 0.0:
        return clean.astype(np.float32, copy=True)
    return (wet * math.sqrt(signal_power(clean) / wet_power)).astype(np.float32)


def band_limit(clean: np.ndarray, low_rate: int, sample_rate: int) -> np.ndarray:
    """Resample to `low_rate` and back (content above low_rate/2 removed). (T,) -> (T,)."""
    if low_rate >= sample_rate:
        return clean.astype(np.float32, copy=True)
    low = soxr.resample(clean.astype(np.float32), sample_rate, low_rate, quality="VHQ")
    back = soxr.resample(low, low_rate, sample_rate, quality="VHQ")
    # soxr rounds lengths; the pair must stay sample-aligned with the clean target.
    out = np.zeros(clean.size, dtype=np.float32)
    n = min(clean.size, back.size)
    out[:n] = back[:n]
    return out


def clip(clean: np.ndarray, quantile: float) -> np.ndarray:
    """Clip at the `quantile` and `1 - quantile` sample quantiles (e.g. 0.1 -> 10 % / 90 %). (T,) -> (T,)."""
    if not 0.0 <= quantile < 0.5:
        raise ValueError(f"clip quantile must be in [0, 0.5), got {quantile}")
    low, high = np.quantile(clean, [quantile, 1.0 - quantile])
    return np.clip(clean, low, high).astype(np.float32)


def _uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    low, high = float(bounds[0]), float(bounds[1])
    return low if high <= low else float(rng.uniform(low, high))


def _random_positions(rng: np.random.Generator, room: np.ndarray, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """Source and microphone inside the room, away from the walls, at a distance in the configured range."""
    margin = float(config["rir_wall_margin"])
    low_d, high_d = config["rir_source_mic_distance"]
    for _ in range(1000):
        source = rng.uniform(margin, room - margin)
        mic = rng.uniform(margin, room - margin)
        if low_d <= np.linalg.norm(source - mic) <= high_d:
            return source, mic
    raise UserError(
        f"data.degradation: no source/microphone placement fits rir_source_mic_distance "
        f"{config['rir_source_mic_distance']}"
        f" in rooms of {room.round(2).tolist()} m with rir_wall_margin {margin}")


def simulate_rir(rng: np.random.Generator, config: dict, sample_rate: int) -> tuple[np.ndarray, dict]:
    """A shoebox-room impulse response from pyroomacoustics (image sources + ray tracing) and its parameters.

    `config` is the "data.degradation" section. The response starts at its direct path (its largest sample),
    so reverberant speech stays time-aligned with the clean target. Returns ((L,) float32 peak 1, params).
    """
    import pyroomacoustics as pra  # imported here: it is slow to import and only RIR simulation needs it

    low, high = np.asarray(config["room_dim_min"], float), np.asarray(config["room_dim_max"], float)
    for _ in range(100):
        room_dim = rng.uniform(low, high)
        rt60 = _uniform(rng, config["rt60"])
        try:
            absorption, _ = pra.inverse_sabine(rt60, room_dim)
            break
        except ValueError:  # this room is too small to reach that RT60 even with rigid walls
            continue
    else:
        raise UserError(f"data.degradation: rooms between {low.tolist()} and {high.tolist()} m cannot reach "
                        f"RT60 {config['rt60']}")
    source, mic = _random_positions(rng, room_dim, config)
    room = pra.ShoeBox(room_dim, fs=sample_rate, materials=pra.Material(absorption),
                       max_order=int(config["rir_ism_order"]), ray_tracing=True,
                       air_absorption=bool(config["rir_air_absorption"]))
    # pyroomacoustics' ray tracer has its own package-wide generators: seed them from ours so the RIR is
    # reproducible (this is pyroomacoustics' state, not numpy's global one).
    pra.random.seed(numpy=int(rng.integers(0, 2**63 - 1)), libroom=int(rng.integers(0, 2**63 - 1)))
    room.set_ray_tracing(n_rays=int(config["rir_rays"]), receiver_radius=float(config["rir_receiver_radius"]))
    room.add_source(source.tolist())
    room.add_microphone(mic.tolist())
    room.compute_rir()
    rir = np.asarray(room.rir[0][0], dtype=np.float64)
    rir = rir[int(np.argmax(np.abs(rir))):][: int(config["rir_max_seconds"] * sample_rate)]
    rir = (rir / np.max(np.abs(rir))).astype(np.float32)
    params = {"rt60": round(rt60, 4), "room_dim": [round(float(d), 3) for d in room_dim],
              "source": [round(float(v), 3) for v in source], "mic": [round(float(v), 3) for v in mic],
              "distance": round(float(np.linalg.norm(source - mic)), 3), "absorption": round(float(absorption), 4)}
    return rir, params


@dataclass
class AudioBank:
    """Noises or room impulse responses held in memory, with a name (and optional parameters) for each."""

    signals: list[np.ndarray]
    names: list[str] = field(default_factory=list)
    params: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.names:
            self.names = [f"#{i}" for i in range(len(self.signals))]
        if not self.params:
            self.params = [{} for _ in self.signals]

    def __len__(self) -> int:
        return len(self.signals)

    def pick(self, rng: np.random.Generator, what: str) -> tuple[np.ndarray, str, dict]:
        if not self.signals:
            raise UserError(f"the {what} bank is empty: cannot apply a {what} degradation")
        i = int(rng.integers(0, len(self.signals)))
        return self.signals[i], self.names[i], self.params[i]


def simulate_rir_bank(count: int, seed: int, config: dict, sample_rate: int) -> AudioBank:
    """`count` simulated RIRs, item i drawn from its own generator so the bank is identical for a given seed."""
    bank = AudioBank([], [], [])
    for i in range(count):
        rir, params = simulate_rir(np.random.default_rng([seed, i]), config, sample_rate)
        bank.signals.append(rir)
        bank.names.append(f"simulated-{seed}-{i}")
        bank.params.append(params)
    return bank


def check_degradation_config(config: dict) -> None:
    """Refuse probabilities that do not form a distribution over CONDITIONS, or a bad speed range (one-line
    UserError)."""
    probs = [config[f"p_{c}"] for c in CONDITIONS]
    if any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        names = ", ".join(f"p_{c}" for c in CONDITIONS)
        raise UserError(f"data.degradation: {names} must be >= 0 and sum to 1 (they sum to {sum(probs):g})")
    low, high = (float(f) for f in config["speed_factor"])
    if not 0.0 <= float(config["p_speed_change"]) <= 1.0 or not 0.0 < low <= high:
        raise UserError("data.degradation: p_speed_change must be in [0, 1] and speed_factor a range "
                        f"[low, high] with 0 < low <= high (got {config['p_speed_change']}, {config['speed_factor']})")


def degrade(clean: np.ndarray, rng: np.random.Generator, config: dict, noise_bank: AudioBank | None,
            rir_bank: AudioBank | None, condition: str | None = None, *,
            sample_rate: int) -> tuple[np.ndarray, dict]:
    """One random degradation of `clean` (T,) -> ((T,) float32, description).

    `config` is "data.degradation". The condition is drawn with its p_<condition> unless given. The description
    holds the condition and every parameter drawn (snr_db, noise name, rir name and room, rate, quantile).
    The output may exceed +-1; see `fit_peak`.
    """
    if condition is None:
        check_degradation_config(config)
        probs = np.array([config[f"p_{c}"] for c in CONDITIONS], dtype=float)
        condition = CONDITIONS[int(rng.choice(len(CONDITIONS), p=probs / probs.sum()))]
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r} (expected one of {', '.join(CONDITIONS)})")
    description: dict[str, Any] = {"condition": condition}
    x = clean.astype(np.float32)
    if condition in ("reverb", "mixture"):
        rir, name, params = (rir_bank or AudioBank([])).pick(rng, "rir")
        x = reverberate(x, rir)
        description |= {"rir": name, **params}
    if condition in ("noise", "mixture"):
        noise, name, _ = (noise_bank or AudioBank([])).pick(rng, "noise")
        snr = _uniform(rng, config["snr_db" if condition == "noise" else "mixture_snr_db"])
        x = add_noise(x, noise, snr, rng, float(config["noise_min_relative_power_db"]))
        description |= {"noise": name, "snr_db": round(snr, 3)}
    if condition == "bandlimit":
        rate = int(rng.choice(config["bandlimit_rates"]))
        x = band_limit(x, rate, sample_rate)
        description["rate"] = rate
    if condition == "clipping":
        quantile = _uniform(rng, config["clip_quantile"])
        x = clip(x, quantile)
        description["quantile"] = round(quantile, 4)
    return x, description


def fit_peak(degraded: np.ndarray, clean: np.ndarray, max_peak: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Scale both signals by one gain so that neither peaks above `max_peak` (they stay a consistent pair)."""
    peak = max(float(np.max(np.abs(degraded), initial=0.0)), float(np.max(np.abs(clean), initial=0.0)))
    gain = 1.0 if peak <= max_peak else max_peak / peak
    return (degraded * gain).astype(np.float32), (clean * gain).astype(np.float32), gain
