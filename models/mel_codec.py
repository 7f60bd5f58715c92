"""The demo codec: a fixed split VQ of the 50 Hz log-mel, a learned decoder back to the log-mel, Griffin-Lim.

Shapes: wav (batch, samples) -> standardised log-mel (batch, n_mels, 400 Hz frames) -> its mean over each token
frame, the latent (batch, n_mels, 50 Hz frames) -> tokens (batch, groups, frames) -> decoded log-mel (batch, n_mels,
400 Hz frames) -> wav.

Why this shape (docs/experiments.md): on held-out speech the frame means of the log-mel, split into groups of
adjacent bands and quantised by k-means codebooks, carried more than a learned encoder trained for a CPU-hour, and
a log-mel decoder leaves the phase to Griffin-Lim on an 8x redundant STFT instead of learning it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from models.codec import Codec, CodecOutput
from models.convnext import ConvNeXtTrunk
from models.griffin_lim import MelGriffinLim
from models.log_mel import LogMel
from models.quantizers import SplitVectorQuantizer


class MelDecoder(nn.Module):
    """Latent (batch, n_mels, frames) -> log-mel residual (batch, n_mels, frames * upsample).

    The trunk runs at the token rate, before the upsampling (8x cheaper per block than after it). Its last layer
    starts at zero, so a fresh codec outputs exactly its skip (MelCodec.decode_latent): the split VQ's own
    reconstruction.
    """

    def __init__(self, n_mels: int, dim: int, intermediate_dim: int, num_blocks: int, kernel_size: int,
                 upsample: int, upsample_kernel: int):
        super().__init__()
        pad = kernel_size // 2
        self.conv_in = weight_norm(nn.Conv1d(n_mels, dim, kernel_size, padding=pad))
        self.trunk = ConvNeXtTrunk(dim, intermediate_dim, num_blocks, kernel_size)
        self.upsample = weight_norm(
            nn.ConvTranspose1d(dim, dim, upsample_kernel, stride=upsample, padding=(upsample_kernel - upsample) // 2)
        )
        self.conv_mid = nn.Conv1d(dim, dim, kernel_size, padding=pad)
        self.conv_out = weight_norm(nn.Conv1d(dim, n_mels, kernel_size, padding=pad))
        self.conv_out.parametrizations.weight.original0.data.zero_()
        self.conv_out.bias.data.zero_()

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv_mid(self.upsample(self.trunk(self.conv_in(latent)))))


class MelCodec(Codec):
    """Weightless encoder (standardised log-mel averaged per token frame), split VQ, MelDecoder, Griffin-Lim."""

    tokenizer_keys = ("mel", "downsample", "quantizer")

    def __init__(self, sample_rate: int, mel: dict, downsample: int, quantizer: dict, decoder: dict,
                 griffin_lim: dict):
        """mel: LogMel's arguments but sample_rate; quantizer: num_groups, codebook_size; decoder: MelDecoder's
        but n_mels and upsample; griffin_lim: n_fft, iterations, momentum."""
        super().__init__()
        self.sample_rate, self.hop_length, self.downsample = sample_rate, mel["hop_length"], downsample
        self.log_mel = LogMel(sample_rate, **mel)
        n_mels = mel["n_mels"]
        # Per-band statistics of the training speech (`initialise`): raw log-mel values (mean about -5, each band
        # its own) would leave the k-means codebooks dominated by the loud bands.
        self.register_buffer("analysis_mean", torch.zeros(n_mels, 1))
        self.register_buffer("analysis_std", torch.ones(n_mels, 1))
        self.quantizer = SplitVectorQuantizer(n_mels, **quantizer)
        self.decoder = MelDecoder(n_mels, upsample=downsample, **decoder)
        self.griffin_lim = MelGriffinLim(self.log_mel.filters, mel["hop_length"], mel["win_length"], **griffin_lim)

    def latent(self, wav: torch.Tensor, log_mel: torch.Tensor | None = None) -> torch.Tensor:
        """Token-aligned wav (batch, samples) -> frame means of the standardised log-mel (batch, n_mels, frames).
        log_mel: `self.log_mel(wav)`, if already computed."""
        log_mel = self.log_mel(wav) if log_mel is None else log_mel
        standardised = (log_mel - self.analysis_mean) / self.analysis_std
        return F.avg_pool1d(standardised, self.downsample)

    def forward(self, wav: torch.Tensor) -> CodecOutput:
        tokens = self.quantizer.encode(self.latent(wav))
        zero = torch.zeros((), device=wav.device)
        return CodecOutput(self.decode_latent(self.quantizer.decode(tokens)), self.log_mel(wav), None, tokens, zero,
                           zero)

    def encode(self, wav: torch.Tensor, log_mel: torch.Tensor | None = None) -> torch.Tensor:
        """log_mel: `self.log_mel(wav)` of a token-aligned wav, if already computed (the input blend measures the
        input with it too)."""
        return self.quantizer.encode(self.latent(self.pad(wav), log_mel))

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        decoded = self.decoder(latent)
        means = latent * self.analysis_std + self.analysis_mean  # back from the standardised log-mel
        return decoded + F.interpolate(means, size=decoded.shape[-1], mode="linear", align_corners=False)

    def synthesise(self, decoded: torch.Tensor, length: int | None = None) -> torch.Tensor:
        return self.griffin_lim(decoded, length)

    @torch.no_grad()
    def initialise(self, segments: torch.Tensor, kmeans_iterations: int, seed: int) -> str:
        """Per-band statistics of the log-mel, then the codebooks by k-means on the latents: the tokens are final."""
        log_mel = torch.cat([self.log_mel(chunk) for chunk in segments.split(256)])
        self.analysis_mean.copy_(log_mel.mean(dim=(0, 2))[:, None])
        # A band the data never reaches (band-limited speech) sits at the log floor, with no spread at all.
        self.analysis_std.copy_(log_mel.std(dim=(0, 2)).clamp(min=0.1)[:, None])
        latent = torch.cat([self.latent(chunk) for chunk in segments.split(256)])
        self.quantizer.fit(latent, kmeans_iterations, torch.Generator().manual_seed(seed))
        return (f"log-mel statistics and {self.num_groups} x {self.codebook_size} codebooks (k-means, "
                f"{kmeans_iterations} iterations) from {segments.shape[0]} training segments")

    @classmethod
    def is_tokenizer_weight(cls, name: str) -> bool:
        return name.startswith(("analysis_", "quantizer."))
