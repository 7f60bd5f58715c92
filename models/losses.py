"""Codec training losses: log-mel, MDCT, hinge GAN and feature matching."""
from __future__ import annotations

import librosa
import torch
import torch.nn.functional as F
from torch import nn

from utils import stft


class LogMel(nn.Module):
    """wav (batch, samples) -> log-mel (batch, n_mels, frames), magnitude spectrum, log(clamp(x, floor))."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, win_length: int, n_mels: int,
                 log_floor: float):
        super().__init__()
        self.n_fft, self.hop_length, self.win_length, self.log_floor = n_fft, hop_length, win_length, log_floor
        filters = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)  # no numba compile
        self.register_buffer("filters", torch.from_numpy(filters).float(), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        magnitude = stft(wav.float(), self.n_fft, self.hop_length, self.win_length).abs()
        return torch.log(torch.clamp(torch.matmul(self.filters, magnitude), min=self.log_floor))

    @classmethod
    def from_config(cls, config: dict) -> "LogMel":
        m = config["codec"]["loss"]["mel"]
        return cls(config["sample_rate"], m["n_fft"], m["hop_length"], m["win_length"], m["n_mels"], m["log_floor"])


class MultiScaleLogMel(nn.Module):
    """Mean L1 distance of log-mel spectra at several window lengths (hop = window / 4).

    One 20 ms window cannot resolve the harmonics below ~300 Hz, and the codec's 200 Hz MDCT bins cannot either, so
    a decoder trained on it alone is not told when its pitch harmonics smear into noise; the long windows do tell it.
    """

    def __init__(self, sample_rate: int, windows: list[int], n_mels: list[int], log_floor: float):
        super().__init__()
        if len(windows) != len(n_mels):
            raise ValueError("multi_scale_mel: 'windows' and 'n_mels' must have the same length")
        self.scales = nn.ModuleList(
            LogMel(sample_rate, window, window // 4, window, bands, log_floor) for window, bands in zip(windows, n_mels)
        )

    def forward(self, estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """estimate, reference (batch, samples) -> scalar."""
        return sum(F.l1_loss(scale(estimate), scale(reference)) for scale in self.scales) / len(self.scales)

    @classmethod
    def from_config(cls, config: dict) -> "MultiScaleLogMel":
        m = config["codec"]["loss"]["multi_scale_mel_spectra"]
        return cls(config["sample_rate"], m["windows"], m["n_mels"], config["codec"]["loss"]["mel"]["log_floor"])


def discriminator_hinge_loss(real: list, fake: list) -> torch.Tensor:
    """Hinge loss over resolutions; `real`/`fake` are lists of (logits, features) from the discriminator."""
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for (r, _), (f, _) in zip(real, fake))


def generator_hinge_loss(fake: list) -> torch.Tensor:
    return sum(F.relu(1 - f).mean() for f, _ in fake)


def feature_matching_loss(real: list, fake: list) -> torch.Tensor:
    """Mean L1 between real and generated discriminator feature maps, averaged over layers, summed over resolutions."""
    total = 0.0
    for (_, real_features), (_, fake_features) in zip(real, fake):
        total = total + sum(F.l1_loss(f, r.detach()) for r, f in zip(real_features, fake_features)) / len(real_features)
    return total
