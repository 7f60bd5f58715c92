"""Waveform from a log-mel spectrogram: pseudo-inverse of the mel filterbank, then fast Griffin-Lim.

Shapes: log-mel (batch, n_mels, frames) -> wav (batch, samples), with frames = samples / hop + 1 (centred STFT).

Why a codec decoder may end here instead of in an inverse MDCT: the MDCT is critically sampled, so every sign pattern
of its coefficients is a valid signal and a decoder must learn the signs (the phase) from data; on a CPU budget it
does not (see MODEL_CARD.md). A centred STFT with hop 40 and window 320 is 8x redundant, so a phase consistent with
a magnitude can be found by iteration instead of learned.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError, istft, stft


class MelGriffinLim(nn.Module):
    """Fast Griffin-Lim (Perraudin et al., 2013) from zero phase, so the same input always gives the same output."""

    def __init__(self, mel_filters: torch.Tensor, hop_length: int, win_length: int, n_fft: int, iterations: int,
                 momentum: float):
        """mel_filters (n_mels, mel_n_fft // 2 + 1): the filterbank that made the log-mel (`LogMel.filters`), so the
        two cannot drift apart."""
        super().__init__()
        mel_n_fft = 2 * (mel_filters.shape[-1] - 1)
        if mel_n_fft % n_fft or n_fft < win_length:
            raise UserError(f"griffin_lim.n_fft ({n_fft}) must divide the mel n_fft ({mel_n_fft}) and cover the "
                             f"window ({win_length})")
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        self.iterations, self.momentum = iterations, momentum
        # A window zero-padded to mel_n_fft has, at every (mel_n_fft / n_fft)-th bin, exactly the n_fft spectrum:
        # the iteration runs on the shorter FFT (the cost) without changing the magnitude it aims at.
        inverse = torch.linalg.pinv(mel_filters.double())[:: mel_n_fft // n_fft]
        self.register_buffer("inverse_filters", inverse.float(), persistent=False)

    def magnitude(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> linear STFT magnitude (batch, n_fft // 2 + 1, frames)."""
        return torch.matmul(self.inverse_filters, log_mel.float().exp()).clamp_(min=0.0)

    def forward(self, log_mel: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """log_mel (batch, n_mels, frames) -> wav (batch, length or (frames - 1) * hop); longer is zero-padded."""
        magnitude = self.magnitude(log_mel)
        full = (magnitude.shape[-1] - 1) * self.hop_length  # the length whose STFT has exactly these frames
        spec = (self.n_fft, self.hop_length, self.win_length)
        phase = torch.ones_like(magnitude, dtype=torch.complex64)
        previous = torch.zeros_like(phase)
        for _ in range(self.iterations):
            rebuilt = stft(istft(magnitude * phase, *spec, full), *spec)
            accelerated = rebuilt + self.momentum * (rebuilt - previous)
            previous = rebuilt
            phase = accelerated / accelerated.abs().clamp_(min=1e-8)
        wav = istft(magnitude * phase, *spec, full)
        return wav if length is None else F.pad(wav, (0, max(0, length - full)))[..., :length]
