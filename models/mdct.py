"""Modified discrete cosine transform with a sine window and time-domain alias cancellation.

Shapes: waveform (batch, samples) <-> coefficients (batch, hop_length, frames), frames = samples / hop + 1 for
samples that are a multiple of the hop (other lengths are padded on the right and trimmed back on inversion).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError


def exact_product(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x @ basis in float32 (or x's dtype, if wider), under autocast too: at bfloat16 the transform alone would cap
    the codec's reconstruction near 50 dB SNR and put that floor under its training losses on a GPU."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return torch.matmul(x.to(dtype), basis.to(dtype))


class MDCT(nn.Module):
    """Orthonormal MDCT: frame 2N, hop N, N coefficients a frame; `inverse` reconstructs the input exactly."""

    def __init__(self, frame_length: int = 80, hop_length: int = 40):
        super().__init__()
        if frame_length != 2 * hop_length:
            raise UserError("MDCT needs frame_length == 2 * hop_length for alias cancellation")
        self.frame_length = frame_length
        self.hop_length = hop_length
        n = torch.arange(frame_length, dtype=torch.float64)
        k = torch.arange(hop_length, dtype=torch.float64)
        window = torch.sin(math.pi * (n + 0.5) / frame_length)  # Princen-Bradley: w[n]^2 + w[n+N]^2 = 1
        phase = math.pi / hop_length * (n[:, None] + 0.5 + hop_length / 2) * (k[None, :] + 0.5)
        # Windowed cosine basis (frame_length, hop_length); sqrt(2/N) makes forward and inverse transposes.
        basis = math.sqrt(2.0 / hop_length) * window[:, None] * torch.cos(phase)
        self.register_buffer("basis", basis.float(), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(batch, samples) or (samples,) -> (batch, hop, frames) or (hop, frames)."""
        squeeze = wav.dim() == 1
        if squeeze:
            wav = wav[None]
        hop = self.hop_length
        right = (-wav.shape[-1]) % hop + hop  # centre padding plus completion to a whole hop
        padded = F.pad(wav, (hop, right))
        frames = padded.unfold(-1, self.frame_length, hop)  # (batch, frames, frame_length)
        coefficients = exact_product(frames, self.basis).transpose(1, 2)
        return coefficients[0] if squeeze else coefficients

    def inverse(self, coefficients: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """(batch, hop, frames) -> (batch, samples); `length` trims/pads to the original sample count."""
        squeeze = coefficients.dim() == 2
        if squeeze:
            coefficients = coefficients[None]
        hop = self.hop_length
        num_frames = coefficients.shape[-1]
        frames = exact_product(coefficients.transpose(1, 2), self.basis.t())
        # Overlap-add: fold sums the windowed frames back onto the padded time axis.
        total = hop * (num_frames + 1)
        wav = F.fold(
            frames.transpose(1, 2), output_size=(1, total), kernel_size=(1, self.frame_length), stride=(1, hop)
        )[:, 0, 0, hop:]
        natural = hop * (num_frames - 1)
        wav = wav[:, :natural]
        if length is not None:
            wav = wav[:, :length] if length <= natural else F.pad(wav, (0, length - natural))
        return wav[0] if squeeze else wav


def bin_correlation(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Correlation over time of two MDCT spectra, per bin: (batch, bins, frames) x 2 -> (bins,), batch pooled.

    1 when the estimate reproduces the reference's coefficients including their signs (the waveform's phase),
    0 when its signs are unrelated to the reference's, whatever its magnitudes.
    """
    products = (reference * estimate).sum(dim=(0, 2))
    energies = reference.square().sum(dim=(0, 2)) * estimate.square().sum(dim=(0, 2))
    return products / (energies.sqrt() + 1e-12)
