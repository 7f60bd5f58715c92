"""ConvNeXt-v2 blocks: the trunk of both codecs' encoders and decoders.

Shapes: a trunk maps (batch, dim, frames) -> (batch, dim, frames); inside, the blocks work frames-last,
(batch, frames, dim), so the LayerNorms and Linears read contiguous rows and no transposed copy is made per block.

Without autograd, on CPU in float32, a block's inverted bottleneck runs as two oneDNN calls (see
`ConvNeXtBlock.fused_bottleneck`): the same arithmetic in another order, outputs within float rounding of the
layer-by-layer path, which training and every other device use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import onednn


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-v2 GRN on (batch, frames, channels): x * (1 + gamma * relative energy) + beta.

    The per-channel energy comes from a contiguous sum of squares (a vector norm over the frame axis walks memory
    with a stride and was about 12x slower on CPU), and the affine steps fold into one addcmul.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def gain(self, x: torch.Tensor) -> torch.Tensor:
        """Each item's per-channel factor, (batch, 1, channels): the GRN is x * gain(x) + beta."""
        energy = x.square().sum(dim=1, keepdim=True).sqrt()
        relative = energy / (energy.mean(dim=-1, keepdim=True) + 1e-6)
        return torch.addcmul(torch.ones_like(relative), self.gamma, relative)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, x, self.gain(x))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, LayerNorm, inverted bottleneck with GELU and GRN, residual: (batch, frames, dim)."""

    def __init__(self, dim: int, intermediate_dim: int, kernel_size: int):
        super().__init__()
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.expand = nn.Linear(dim, intermediate_dim)
        self.grn = GlobalResponseNorm(intermediate_dim)
        self.project = nn.Linear(intermediate_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.depthwise
        # The depthwise conv runs as a 2-D conv on a channels-last view: its output is then already (frames, dim) in
        # memory for the LayerNorm, and oneDNN's channels-last depthwise kernel is the faster one on CPU.
        y = F.conv2d(x.transpose(1, 2).unsqueeze(2), conv.weight.unsqueeze(2), conv.bias,
                     padding=(0, conv.padding[0]), groups=conv.groups)  # (batch, dim, 1, frames), channels-last
        y = self.norm(y.squeeze(2).transpose(1, 2))
        if onednn.applies(y):
            return self.fused_bottleneck(x, y)
        return x + self.project(self.grn(F.gelu(self.expand(y))))

    def fused_bottleneck(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + project(grn(gelu(expand(y)))) in two oneDNN calls per item, for inference on CPU.

        Layer by layer, the GELU, the GRN, the bias of each Linear and the residual each read and write the whole
        (frames, intermediate_dim) activation once more. Here the expansion applies its bias and GELU as it writes;
        the GRN, a per-channel gain and shift, is folded into the projection's weight and bias (at the paper
        configuration the weight is 16x smaller than the activation); the projection adds the residual as it
        writes. 10 s at the paper configuration on one thread: encoder 242 -> 222 ms, decoder 281 -> 261 ms
        (docs/experiments.md item 44).
        """
        hidden = onednn.linear(y, self.expand.weight, self.expand.bias, "gelu")
        gain = self.grn.gain(hidden)
        bias = torch.addmv(self.project.bias, self.project.weight, self.grn.beta.view(-1))
        items = [onednn.linear_add(hidden[i], x[i], self.project.weight * gain[i], bias)
                 for i in range(x.shape[0])]
        return torch.stack(items) if len(items) > 1 else items[0].unsqueeze(0)


class ConvNeXtTrunk(nn.Module):
    """LayerNorm, ConvNeXt blocks, LayerNorm, Linear: (batch, dim, frames) -> (batch, dim, frames)."""

    def __init__(self, dim: int, intermediate_dim: int, num_blocks: int, kernel_size: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.blocks = nn.Sequential(*(ConvNeXtBlock(dim, intermediate_dim, kernel_size) for _ in range(num_blocks)))
        self.norm_out = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.norm_in(x.transpose(1, 2)))
        return self.linear(self.norm_out(x)).transpose(1, 2)
