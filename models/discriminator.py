"""Multi-resolution MDCT discriminator: 2-D conv stacks on MDCT spectra at several frame lengths."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from models.mdct import MDCT


class MDCTDiscriminator(nn.Module):
    """One resolution: MDCT (frame L, hop L/2) viewed as an image (batch, 1, frames, bins)."""

    def __init__(self, frame_length: int, channels: int, kernels: list, strides: list, output_kernel: list,
                 slope: float):
        super().__init__()
        self.mdct = MDCT(frame_length, frame_length // 2)
        self.slope = slope
        layers, in_channels = [], 1
        for kernel, stride in zip(kernels, strides):
            padding = (kernel[0] // 2, kernel[1] // 2)
            layers.append(weight_norm(nn.Conv2d(in_channels, channels, tuple(kernel), tuple(stride), padding)))
            in_channels = channels
        self.layers = nn.ModuleList(layers)
        self.output = weight_norm(
            nn.Conv2d(channels, 1, tuple(output_kernel), padding=(output_kernel[0] // 2, output_kernel[1] // 2))
        )

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.mdct(wav).transpose(1, 2)[:, None]  # (batch, 1, frames, bins)
        features = []
        for layer in self.layers:
            x = F.leaky_relu(layer(x), self.slope)
            features.append(x)
        x = self.output(x)
        features.append(x)
        return x.flatten(1), features


class MultiResolutionMDCTDiscriminator(nn.Module):
    """wav (batch, samples) -> per resolution: (logits (batch, n), feature maps)."""

    def __init__(self, frame_lengths: list[int], channels: int, kernels: list, strides: list, output_kernel: list,
                 leaky_relu_slope: float):
        super().__init__()
        self.discriminators = nn.ModuleList(
            MDCTDiscriminator(length, channels, kernels, strides, output_kernel, leaky_relu_slope)
            for length in frame_lengths
        )

    def forward(self, wav: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        return [disc(wav) for disc in self.discriminators]
