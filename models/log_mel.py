"""Log-mel spectrogram: the codec's training loss, and the demo codec's analysis and decoder output.

Shapes: wav (batch, samples) -> log-mel (batch, n_mels, frames), frames = samples / hop + 1 (centred STFT).
"""
from __future__ import annotations

import librosa
import torch
from torch import nn

from utils import magnitude, stft


class LogMel(nn.Module):
    """Magnitude STFT through a mel filterbank, then log(clamp(x, log_floor))."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, win_length: int, n_mels: int,
                 log_floor: float):
        super().__init__()
        self.sample_rate, self.n_fft, self.hop_length = sample_rate, n_fft, hop_length
        self.win_length, self.log_floor = win_length, log_floor
        filters = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)  # no numba compile
        self.register_buffer("filters", torch.from_numpy(filters).float(), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        amplitudes = magnitude(stft(wav.float(), self.n_fft, self.hop_length, self.win_length))
        return torch.log(torch.clamp(torch.matmul(self.filters, amplitudes), min=self.log_floor))
