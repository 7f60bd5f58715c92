"""Waveform from a log-mel spectrogram: pseudo-inverse of the mel filterbank, then fast Griffin-Lim.

Shapes: log-mel (batch, n_mels, frames) -> wav (batch, samples), with frames = samples / hop + 1 (centred STFT).

Why a codec decoder may end here instead of in an inverse MDCT: the MDCT is critically sampled, so every sign pattern
of its coefficients is a valid signal and a decoder must learn the signs (the phase) from data; on a CPU budget it
does not (see MODEL_CARD.md). A centred STFT with hop 40 and window 320 is 8x redundant, so a phase consistent with
a magnitude can be found by iteration instead of learned.

Why the iteration does not start from zero phase: the phase of a smooth-window STFT is tied to the gradient of its
log-magnitude (Portnoff; Prusa et al., "A noniterative method for reconstruction of phase from STFT magnitude",
2017). Integrating the instantaneous frequency that the frequency-gradient gives, frame by frame, yields a phase
that is already nearly consistent; a few iterations then do what 32 from zero phase did (research/griffin_lim_options.py
measures the choice).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError, istft, stft


# The Gaussian whose phase-magnitude relation best matches a Hann window of length L has time spread
# lambda = 0.25645 L^2 samples^2 (Prusa et al., 2017, table 1).
HANN_GAUSSIAN_SPREAD = 0.25645


def integrated_phase(magnitude: torch.Tensor, n_fft: int, hop_length: int, win_length: int) -> torch.Tensor:
    """A unit phasor (batch, bins, frames) for an STFT magnitude, from the instantaneous frequency its log-magnitude
    gradient along frequency implies, integrated over frames (trapezoid rule; frame 0 has phase 0).

    For a partial at frequency f (cycles per sample), a Gaussian window of spread lambda makes the log-magnitude
    across bins m a parabola with slope -2 pi lambda (m / n_fft - f) / n_fft, so f = m / n_fft + n_fft / (2 pi lambda)
    * d(log|S|)/dm, and in `stft`'s convention (each frame's DFT relative to its first sample) the phase of bin m
    advances by 2 pi f hop per frame.
    """
    log_magnitude = magnitude.clamp(min=1e-6).log()
    slope = torch.zeros_like(log_magnitude)
    slope[:, 1:-1] = 0.5 * (log_magnitude[:, 2:] - log_magnitude[:, :-2])
    spread = HANN_GAUSSIAN_SPREAD * win_length ** 2
    bins = torch.arange(magnitude.shape[1], device=magnitude.device, dtype=magnitude.dtype)[:, None]
    advance = (2 * math.pi * hop_length / n_fft) * bins + (hop_length * n_fft / spread) * slope
    phase = torch.cumsum(0.5 * (advance[..., 1:] + advance[..., :-1]), dim=-1)
    phase = torch.cat([torch.zeros_like(phase[..., :1]), phase], dim=-1)
    return torch.polar(torch.ones_like(phase), phase)


def at_fft_bins(dense: torch.Tensor, n_fft: int) -> torch.Tensor:
    """Rows of a matrix over the bins of a longer FFT (dense_bins, ...) read at the n_fft // 2 + 1 bin frequencies of
    an FFT of n_fft, by linear interpolation (exact where the sizes divide)."""
    position = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * (2 * (dense.shape[0] - 1) / n_fft)
    below = position.floor().long().clamp(max=dense.shape[0] - 2)
    fraction = (position - below).to(dense.dtype).view(-1, *[1] * (dense.dim() - 1))
    return dense[below] * (1 - fraction) + dense[below + 1] * fraction


class MelGriffinLim(nn.Module):
    """Fast Griffin-Lim (Perraudin et al., 2013) from the integrated phase; deterministic (no random start).

    Long inputs iterate in chunks of `chunk_frames` frames that overlap by `overlap_frames` and are cross-faded:
    Griffin-Lim is local (a frame is tied only to the frames its window overlaps), every chunk starts from the same
    integrated phase, and a chunk's spectrogram stays in the CPU's cache through the iteration where a 10-s one does
    not. `run_tasks` runs the chunks (in order here; cpu_speed runs them as concurrent single-threaded tasks).
    """

    def __init__(self, mel_filters: torch.Tensor, hop_length: int, win_length: int, n_fft: int, iterations: int,
                 momentum: float, chunk_frames: int, overlap_frames: int):
        """mel_filters (n_mels, mel_n_fft // 2 + 1): the filterbank that made the log-mel (`LogMel.filters`), so the
        two cannot drift apart."""
        super().__init__()
        if n_fft < win_length:
            raise UserError(f"griffin_lim.n_fft ({n_fft}) must cover the window ({win_length})")
        if iterations < 0:
            raise UserError(f"griffin_lim.iterations must be 0 or more, not {iterations}")
        if not 2 <= overlap_frames < chunk_frames / 2:
            raise UserError(f"griffin_lim.overlap_frames ({overlap_frames}) must be at least 2 and below half of "
                            f"chunk_frames ({chunk_frames})")
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        self.iterations, self.momentum = iterations, momentum
        self.chunk_frames, self.overlap_frames = chunk_frames, overlap_frames
        self.run_tasks: Callable[[list[Callable[[], torch.Tensor]]], list[torch.Tensor]] = \
            lambda tasks: [task() for task in tasks]
        self.register_buffer("inverse_filters", self.inverse_filterbank(mel_filters, n_fft), persistent=False)

    @staticmethod
    def inverse_filterbank(mel_filters: torch.Tensor, n_fft: int) -> torch.Tensor:
        """(n_fft // 2 + 1, n_mels): the pseudo-inverse of the filterbank, read at this FFT's bin frequencies.

        The log-mel's STFT zero-pads a window shorter than its FFT, so its bins sample the window's spectrum more
        densely than the iteration's FFT does; both sample the same smooth spectrum, and linear interpolation
        between the dense bins (exact where the sizes divide) gives the magnitude the iteration aims at, whose FFT
        can then be as short as the window (the cost).
        """
        return at_fft_bins(torch.linalg.pinv(mel_filters.double()), n_fft).float()

    def magnitude(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> linear STFT magnitude (batch, n_fft // 2 + 1, frames)."""
        return torch.matmul(self.inverse_filters, log_mel.float().exp()).clamp_(min=0.0)

    def initial_phase(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Unit phasors (batch, bins, frames) the iteration starts from."""
        return integrated_phase(magnitude, self.n_fft, self.hop_length, self.win_length)

    def iterate(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """Magnitude and starting phasors (batch, bins, frames) -> wav (batch, (frames - 1) * hop)."""
        full = (magnitude.shape[-1] - 1) * self.hop_length  # the length whose STFT has exactly these frames
        spec = (self.n_fft, self.hop_length, self.win_length)
        previous = torch.zeros_like(phase)
        for _ in range(self.iterations):
            rebuilt = stft(istft(magnitude * phase, *spec, full), *spec)
            # lerp with weight 1 + momentum is rebuilt + momentum * (rebuilt - previous), in one pass; sgn is z / |z|
            phase = torch.lerp(previous, rebuilt, 1.0 + self.momentum).sgn_()
            previous = rebuilt
        return istft(magnitude * phase, *spec, full)

    def chunks(self, frames: int) -> list[tuple[int, int]]:
        """(first, end) frames of nearly equal chunks of at most about chunk_frames, overlapping by overlap_frames."""
        step = self.chunk_frames - self.overlap_frames
        count = max(1, round((frames - self.overlap_frames) / step))
        bounds = [round(i * (frames - self.overlap_frames) / count) for i in range(count + 1)]
        return [(bounds[i], min(frames, bounds[i + 1] + self.overlap_frames)) for i in range(count)]

    def forward(self, log_mel: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """log_mel (batch, n_mels, frames) -> wav (batch, length or (frames - 1) * hop); longer is zero-padded."""
        magnitude = self.magnitude(log_mel)
        phase = self.initial_phase(magnitude)
        frames, hop = magnitude.shape[-1], self.hop_length
        full = (frames - 1) * hop
        spans = self.chunks(frames)
        if len(spans) == 1:
            wav = self.iterate(magnitude, phase)
        else:
            pieces = self.run_tasks([lambda a=a, b=b: self.iterate(magnitude[..., a:b].contiguous(),
                                                                   phase[..., a:b].contiguous()) for a, b in spans])
            fade = (self.overlap_frames - 1) * hop  # a chunk of n frames gives (n - 1) * hop samples
            ramp = torch.linspace(0, 1, fade + 2, device=magnitude.device)[1:-1]
            wav = magnitude.new_zeros(magnitude.shape[0], full)
            for (a, b), piece in zip(spans, pieces):
                weight = torch.ones(piece.shape[-1], device=magnitude.device)
                if a > 0:  # linear cross-fades that sum to one over each overlap
                    weight[:fade] = ramp
                if b < frames:
                    weight[-fade:] = ramp.flip(0)
                wav[:, a * hop: a * hop + piece.shape[-1]] += piece * weight
        return wav if length is None else F.pad(wav, (0, max(0, length - full)))[..., :length]
