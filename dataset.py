"""Training data: the torch Datasets that feed the codec and the enhancer, and the audio files behind them.

Shapes: every waveform is a 1-D float32 array / tensor of samples at 16 kHz (mono). Datasets return
`(segment_length,)` tensors, or whole files when `segment_length` is None.

Determinism: no function here touches a global random state. Each item draws from
`np.random.default_rng([seed, epoch, index, stream])`, so an item depends only on those numbers, whatever the
DataLoader's worker count or order. The distortions themselves (noise, reverberation, band-limiting, clipping)
are in degradations.py; every range and probability comes from the config's "data" section.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from degradations import (AudioBank, change_speed, check_degradation_config, degrade, draw_speed_factor, fit_peak,
                          signal_power, simulate_rir_bank)
from utils import AudioError, UserError, find_audio_files, load_audio

log = logging.getLogger("paragse.data")

# Separate random streams per item, so that e.g. changing the degradation does not move the crop position.
_CROP_STREAM, _DEGRADE_STREAM, _SPEED_STREAM = 0, 1, 2
_INT16_SCALE = 32767.0


# ===================================================================================================== files
def resolve_files(root_or_files: str | Path | Sequence[str | Path], what: str) -> list[Path]:
    """A folder (searched recursively for wav/flac/ogg) or an explicit list of files -> list of paths."""
    if isinstance(root_or_files, (str, Path)):
        root = Path(root_or_files)
        if not root.is_dir():
            raise UserError(f"{what} folder not found: {root}")
        files = [root / f for f in find_audio_files(root)]
    else:
        files = [Path(f) for f in root_or_files]
    if not files:
        raise UserError(f"no .wav/.flac/.ogg/.mp3 {what} files in {root_or_files}")
    return files


def _display_name(path: Path, root_or_files: Any) -> str:
    if isinstance(root_or_files, (str, Path)):
        try:
            return str(path.relative_to(root_or_files))
        except ValueError:
            pass
    return str(path)


def _try_load(path: Path, sample_rate: int) -> np.ndarray | None:
    """load_audio, or None after a one-line warning naming the file (one bad file must not stop a run)."""
    try:
        return load_audio(path, sample_rate)[0]
    except AudioError as e:
        log.warning("skipping %s: %s", path, e)
        return None


def load_bank(root_or_files: str | Path | Sequence[str | Path], sample_rate: int, what: str) -> AudioBank:
    """Every readable, non-silent audio file of a folder (or list), in memory; others are skipped with a warning."""
    files = resolve_files(root_or_files, what)
    bank = AudioBank([], [], [])
    for path in files:
        audio = _try_load(path, sample_rate)
        if audio is None:
            continue
        if signal_power(audio) == 0.0:
            log.warning("skipping %s: silent (all samples are zero)", path)
            continue
        bank.signals.append(audio)
        bank.names.append(_display_name(path, root_or_files))
        bank.params.append({})
    if not bank.signals:
        raise UserError(f"no usable {what} audio in {root_or_files}")
    return bank


def _probe_length(path: Path, sample_rate: int) -> int | None:
    """Length in samples at `sample_rate` from the header alone, or None (with a warning) if unreadable."""
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        reason = str(e).splitlines()[-1] if str(e) else type(e).__name__
        log.warning("skipping %s: cannot read audio header (%s)", path, reason)
        return None
    if info.frames <= 0:
        log.warning("skipping %s: empty file (0 samples)", path)
        return None
    return int(round(info.frames * sample_rate / info.samplerate))


def _to_int16(audio: np.ndarray) -> np.ndarray:
    return np.round(np.clip(audio, -1.0, 1.0) * _INT16_SCALE).astype(np.int16)


def _from_int16(audio: np.ndarray) -> np.ndarray:
    return audio.astype(np.float32) / _INT16_SCALE


def random_offset(length: int, segment_length: int, rng: np.random.Generator) -> int:
    """Uniform start of a segment_length window inside `length` samples (0 if it does not fit)."""
    return int(rng.integers(0, length - segment_length + 1)) if length > segment_length else 0


def window(audio: np.ndarray, start: int, segment_length: int) -> np.ndarray:
    """audio[start:start + segment_length], zero-padded at the end to exactly segment_length samples."""
    part = audio[start:start + segment_length]
    return np.pad(part, (0, segment_length - part.size)) if part.size < segment_length else part


def crop(audio: np.ndarray, segment_length: int | None, rng: np.random.Generator) -> np.ndarray:
    """A random (segment_length,) window of `audio`, zero-padded at the end if the file is shorter."""
    if segment_length is None:
        return audio
    return window(audio, random_offset(audio.size, segment_length, rng), segment_length)


class _FileStore:
    """Audio files, preloaded as int16 (cache) or read on demand; unreadable files are warned about and skipped.

    Preloading happens in the constructing process, before DataLoader workers fork, so workers share the
    pages instead of each holding a copy.
    """

    def __init__(self, files: Sequence[Path], sample_rate: int, cache: bool) -> None:
        self.sample_rate, self.cache = sample_rate, cache
        self.files: list[Path] = []
        self.lengths: list[int] = []
        self.skipped: list[str] = []
        self._audio: list[np.ndarray] = []
        for path in files:
            if cache:
                audio = _try_load(path, sample_rate)
                length = None if audio is None else audio.size
            else:
                audio, length = None, _probe_length(path, sample_rate)
            if length is None:
                self.skipped.append(str(path))
                continue
            self.files.append(path)
            self.lengths.append(length)
            if audio is not None:
                self._audio.append(_to_int16(audio))
        self._broken: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the files at `indices` (in that order)."""
        self.files = [self.files[i] for i in indices]
        self.lengths = [self.lengths[i] for i in indices]
        if self._audio:
            self._audio = [self._audio[i] for i in indices]

    def load(self, i: int) -> np.ndarray | None:
        """File i as float32, or None if it fails to decode now (warned once per process)."""
        if self.cache:
            return _from_int16(self._audio[i])
        if i in self._broken:
            return None
        audio = _try_load(self.files[i], self.sample_rate)
        if audio is None:
            self._broken.add(i)
        return audio

    def load_usable(self, i: int) -> tuple[int, np.ndarray]:
        """File i, or the next file that loads if i has gone bad since construction."""
        for step in range(len(self.files)):
            j = (i + step) % len(self.files)
            audio = self.load(j)
            if audio is not None:
                return j, audio
        raise RuntimeError("no audio file of the dataset can be decoded any more (see the warnings above)")


def _require_files(store: _FileStore, what: str, source: Any) -> None:
    if not len(store):
        raise UserError(f"no usable {what} audio in {source} (every file failed to load)")


# =================================================================================================== datasets
class CleanSegmentDataset(Dataset):
    """Random segments of clean speech, for codec training.

    Item: float32 tensor (segment_length,) (zero-padded if the file is shorter), or the whole file (T,) when
    segment_length is None (then item i is file i). Segments are drawn from files in proportion to their
    duration, so an epoch of `len(self)` items covers the corpus about once by default.
    """

    def __init__(self, root_or_files: str | Path | Sequence[str | Path], segment_length: int | None, seed: int,
                 sample_rate: int, segments_per_epoch: int | None = None, cache: bool = True) -> None:
        """root_or_files: folder searched recursively, or a list of files. segments_per_epoch: default (None)
        is total samples // segment_length. cache: hold all audio in memory as int16 (~115 MB per hour)."""
        self.segment_length, self.seed, self.epoch = segment_length, seed, 0
        self.store = _FileStore(resolve_files(root_or_files, "speech"), sample_rate, cache)
        _require_files(self.store, "speech", root_or_files)
        self._cumulative = np.cumsum(np.asarray(self.store.lengths, dtype=np.int64))
        total = int(self._cumulative[-1])
        self._length = (len(self.store) if segment_length is None
                        else segments_per_epoch or max(1, total // segment_length))

    @property
    def files(self) -> list[Path]:
        return self.store.files

    @property
    def skipped(self) -> list[str]:
        """Files dropped at construction because they could not be read."""
        return self.store.skipped

    def set_epoch(self, epoch: int) -> None:
        """Draw new segments for a new epoch (call before the epoch's DataLoader iterator is created)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._length

    def segment(self, index: int, length: int | None = None) -> np.ndarray:
        """The numpy segment of item `index` (see the class docstring for its shape); `length` samples instead
        of segment_length if given (not when segment_length is None: then it is the whole file)."""
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} items")
        rng = np.random.default_rng([self.seed, self.epoch, index, _CROP_STREAM])
        if self.segment_length is None:
            file_index = index
        else:
            position = int(rng.integers(0, int(self._cumulative[-1])))
            file_index = int(np.searchsorted(self._cumulative, position, side="right"))
        _, audio = self.store.load_usable(file_index)
        return crop(audio, None if self.segment_length is None else length or self.segment_length, rng)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.segment(index), dtype=np.float32))


class PairedDataset(Dataset):
    """(degraded, clean) pairs from two folders matched by relative path (the VoiceBank+DEMAND layout).

    Item i: two float32 tensors (segment_length,) cut at the same random offset (zero-padded if shorter), or
    the whole pair (T,) when segment_length is None. Attributes name what could not be paired:
    `unmatched_degraded`, `unmatched_clean` (relative paths), `length_mismatched` (trimmed to the shorter),
    `skipped` (unreadable).
    """

    def __init__(self, degraded_root: str | Path, clean_root: str | Path, segment_length: int | None, seed: int,
                 sample_rate: int, cache: bool = False) -> None:
        self.segment_length, self.seed, self.epoch, self.sample_rate = segment_length, seed, 0, sample_rate
        self.degraded_root, self.clean_root = Path(degraded_root), Path(clean_root)
        degraded = set(_relative_files(self.degraded_root, "degraded"))
        clean = set(_relative_files(self.clean_root, "clean"))
        self.unmatched_degraded = sorted(str(p) for p in degraded - clean)
        self.unmatched_clean = sorted(str(p) for p in clean - degraded)
        _warn_unmatched(self.unmatched_degraded, "degraded", self.degraded_root, self.clean_root)
        _warn_unmatched(self.unmatched_clean, "clean", self.clean_root, self.degraded_root)
        self.names, self.length_mismatched, self.skipped = [], [], []
        self._degraded = self._clean = None
        self._pair_up(sorted(degraded & clean), cache)

    @classmethod
    def voicebank(cls, root: str | Path, split: str, segment_length: int | None, seed: int,
                  **kwargs: Any) -> "PairedDataset":
        """The VoiceBank+DEMAND pairs of `split` ("train" or "test") under a resampled download's root."""
        folders = {"train": ("noisy_trainset_28spk_wav", "clean_trainset_28spk_wav"),
                   "test": ("noisy_testset_wav", "clean_testset_wav")}
        if split not in folders:
            raise UserError(f"VoiceBank+DEMAND split must be 'train' or 'test', got {split!r}")
        noisy, clean = folders[split]
        return cls(Path(root) / noisy, Path(root) / clean, segment_length, seed, **kwargs)

    def _pair_up(self, relatives: list[Path], cache: bool) -> None:
        kept: list[Path] = []
        for rel in relatives:
            probes = [_probe_length(root / rel, self.sample_rate) for root in (self.degraded_root, self.clean_root)]
            if None in probes:
                self.skipped.append(str(rel))
                continue
            if probes[0] != probes[1]:
                self.length_mismatched.append(str(rel))
                log.warning("pair %s: degraded has %d samples, clean %d; trimming both to %d",
                            rel, probes[0], probes[1], min(probes))
            kept.append(rel)
        self._degraded = _FileStore([self.degraded_root / rel for rel in kept], self.sample_rate, cache)
        self._clean = _FileStore([self.clean_root / rel for rel in kept], self.sample_rate, cache)
        # A file whose header reads but whose audio does not decode is dropped from one side while caching:
        # keep the two sides aligned on the pairs that survived in both.
        degraded_index = {p.relative_to(self.degraded_root): i for i, p in enumerate(self._degraded.files)}
        clean_index = {p.relative_to(self.clean_root): i for i, p in enumerate(self._clean.files)}
        survivors = [rel for rel in kept if rel in degraded_index and rel in clean_index]
        self.skipped += [str(rel) for rel in kept if rel not in degraded_index or rel not in clean_index]
        self._degraded.keep([degraded_index[rel] for rel in survivors])
        self._clean.keep([clean_index[rel] for rel in survivors])
        self.names = [str(rel) for rel in survivors]
        if not self.names:
            raise UserError(f"no usable pairs matched by relative path between {self.degraded_root} and "
                            f"{self.clean_root}")

    def set_epoch(self, epoch: int) -> None:
        """Draw new segment offsets for a new epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.names)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Numpy (degraded, clean) of item `index`."""
        if not 0 <= index < len(self.names):
            raise IndexError(f"index {index} out of range for {len(self.names)} pairs")
        for step in range(len(self.names)):
            i = (index + step) % len(self.names)
            degraded, clean = self._degraded.load(i), self._clean.load(i)
            if degraded is not None and clean is not None:
                break
        else:
            raise RuntimeError("no pair of the dataset can be decoded any more (see the warnings above)")
        length = min(degraded.size, clean.size)
        degraded, clean = degraded[:length], clean[:length]
        if self.segment_length is None:
            return degraded, clean
        rng = np.random.default_rng([self.seed, self.epoch, index, _CROP_STREAM])
        start = random_offset(length, self.segment_length, rng)
        return window(degraded, start, self.segment_length), window(clean, start, self.segment_length)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        degraded, clean = self.pair(index)
        return (torch.from_numpy(np.ascontiguousarray(degraded, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(clean, dtype=np.float32)))


def _relative_files(root: Path, what: str) -> list[Path]:
    if not root.is_dir():
        raise UserError(f"{what} folder not found: {root}")
    files = find_audio_files(root)
    if not files:
        raise UserError(f"no .wav/.flac/.ogg/.mp3 files in the {what} folder {root}")
    return files


def _warn_unmatched(names: list[str], what: str, root: Path, other: Path) -> None:
    if names:
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        log.warning("%d %s file(s) in %s have no counterpart in %s and are not used: %s",
                    len(names), what, root, other, shown)


class DegradedDataset(Dataset):
    """Clean speech degraded on the fly (noise / reverb / band-limit / clipping / mixture), for the enhancer.

    With data.degradation.p_speed_change > 0 some clean segments are first played faster or slower (voices of
    other sizes); the degraded input is made from that changed speech, so the pair stays consistent.

    Item: (degraded, clean) float32 tensors (segment_length,), or whole files (T,) when segment_length is None.
    Both are scaled by one gain if either would peak above data.degradation.max_peak. `describe(i)` gives the
    degradation drawn for item i. Without `rir_root` a bank of data.degradation.rir_bank_size RIRs is simulated
    here, once, from `seed`.
    """

    def __init__(self, clean_root_or_files: str | Path | Sequence[str | Path], noise_root: str | Path | Sequence,
                 rir_root_or_none: str | Path | Sequence | None, config_data: dict, segment_length: int | None,
                 seed: int, sample_rate: int, segments_per_epoch: int | None = None,
                 cache: bool = True) -> None:
        if "degradation" not in config_data:
            raise UserError("DegradedDataset needs the config's 'data' section (with its 'degradation' object)")
        self.config = config_data["degradation"]
        check_degradation_config(self.config)
        self.seed, self.sample_rate = seed, sample_rate
        self.clean = CleanSegmentDataset(clean_root_or_files, segment_length, seed, sample_rate,
                                         segments_per_epoch, cache)
        self.noise_bank = load_bank(noise_root, sample_rate, "noise")
        if rir_root_or_none is None:
            self.rir_bank = simulate_rir_bank(int(self.config["rir_bank_size"]), seed, self.config, sample_rate)
        else:
            self.rir_bank = load_bank(rir_root_or_none, sample_rate, "rir")

    def set_epoch(self, epoch: int) -> None:
        """New segments and new degradations for a new epoch."""
        self.clean.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.clean)

    def item(self, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """Numpy (degraded, clean, description) of item `index`."""
        speed = draw_speed_factor(np.random.default_rng([self.seed, self.clean.epoch, index, _SPEED_STREAM]),
                                  self.config)
        length = self.clean.segment_length
        if speed == 1.0:
            clean = self.clean.segment(index)
        else:
            # Cut enough source samples that the sped-up (or slowed) speech fills the segment.
            source = self.clean.segment(index, None if length is None else math.ceil(length * speed) + 1)
            clean = change_speed(source, speed, self.sample_rate)
            clean = clean if length is None else window(clean, 0, length)
        rng = np.random.default_rng([self.seed, self.clean.epoch, index, _DEGRADE_STREAM])
        degraded, description = degrade(clean, rng, self.config, self.noise_bank, self.rir_bank,
                                        sample_rate=self.sample_rate)
        degraded, clean, gain = fit_peak(degraded, clean, float(self.config["max_peak"]))
        description["gain"] = round(gain, 5)
        if speed != 1.0:
            description["speed"] = round(speed, 4)
        return degraded, clean, description

    def describe(self, index: int) -> dict:
        """The degradation drawn for item `index` (condition and parameters)."""
        return self.item(index)[2]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        degraded, clean, _ = self.item(index)
        return torch.from_numpy(degraded), torch.from_numpy(np.ascontiguousarray(clean))
