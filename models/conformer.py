"""Conformer blocks and BiLSTMs with a leading *group* axis: G independent networks evaluated in one call.

Every tensor here is (groups, batch, frames, channels). Each group has its own weights, stacked along the first
axis of every parameter (and, for the depthwise convolution and BatchNorm, group-major along the channel axis), so
ParaGSE's N token branches run as one batched computation instead of a Python loop; with groups=1 the same modules
serve the single degraded-spectrum branch. In inference on a CPU a grouped Linear runs one oneDNN product per group,
its bias and activation applied as it writes (models/onednn.py), within float rounding of the batched product.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models import onednn
from utils import UserError


class GroupedLinear(nn.Module):
    """G independent Linear layers: (G, B, T, in) -> (G, B, T, out)."""

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(groups, 1, out_features)) if bias else None
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default initialisation range
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """activation: None, "silu" or "gelu" applied to the output."""
        g, b, t, c = x.shape
        rows = x.reshape(g, b * t, c)
        if onednn.applies(x):
            # In CPU inference each group's product adds its bias and applies the activation as it writes, which
            # saves two passes over the output (two token branches of the paper configuration on one thread:
            # 322 -> 306 ms, docs/experiments.md item 46). weight[i].t() is the (out, in) layout oneDNN reads.
            outputs = [onednn.linear(rows[i], self.weight[i].t(), None if self.bias is None else self.bias[i, 0],
                                     activation) for i in range(g)]
            return (torch.stack(outputs) if g > 1 else outputs[0].unsqueeze(0)).view(g, b, t, -1)
        if g == 1:
            # One group is one matrix product: CPU bmm spreads its threads over the batch axis, so a batch of one
            # ran on a single thread however many there were; mm (addmm) spreads them over the matrix.
            y = rows[0] @ self.weight[0] if self.bias is None else torch.addmm(self.bias[0], rows[0], self.weight[0])
        else:
            y = torch.bmm(rows, self.weight)
            if self.bias is not None:
                y = y + self.bias
        return onednn.LAYER_BY_LAYER[activation](y.view(g, b, t, -1))


class GroupedLayerNorm(nn.Module):
    """LayerNorm over channels with a separate affine transform per group."""

    def __init__(self, groups: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(groups, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(groups, 1, 1, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, F.layer_norm(x, x.shape[-1:], eps=self.eps), self.weight)


class FeedForward(nn.Module):
    def __init__(self, groups: int, dim: int, mult: int, dropout: float):
        super().__init__()
        self.norm = GroupedLayerNorm(groups, dim)
        self.expand = GroupedLinear(groups, dim, dim * mult)
        self.project = GroupedLinear(groups, dim * mult, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.project(self.dropout(self.expand(self.norm(x), activation="silu"))))


class SelfAttention(nn.Module):
    """Multi-head self-attention per group (groups folded into the batch for the attention kernel)."""

    def __init__(self, groups: int, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise UserError(f"conformer dim {dim} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = GroupedLinear(groups, dim, 3 * dim)
        self.out = GroupedLinear(groups, dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, b, t, c = x.shape
        q, k, v = self.qkv(x).view(g * b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(g, b, t, c))


class ConvModule(nn.Module):
    """LN, pointwise to 2*expansion*dim, GLU, dilated depthwise conv, BatchNorm, SiLU, pointwise back to dim.

    The depthwise convolution and BatchNorm keep nn.Conv1d / nn.BatchNorm1d parameters over groups * inner channels
    (group-major), but run group by group on frames-last tensors, so nothing is transposed between the pointwise
    products: see `depthwise_frames_last`.
    """

    def __init__(self, groups: int, dim: int, expansion: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        inner = expansion * dim
        self.groups, self.inner = groups, inner
        self.norm = GroupedLayerNorm(groups, dim)
        self.pointwise_in = GroupedLinear(groups, dim, 2 * inner)
        self.depthwise = nn.Conv1d(groups * inner, groups * inner, kernel_size, dilation=dilation,
                                   padding=dilation * (kernel_size - 1) // 2, groups=groups * inner)
        self.batch_norm = nn.BatchNorm1d(groups * inner)
        self.pointwise_out = GroupedLinear(groups, inner, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.glu(self.pointwise_in(self.norm(x)), dim=-1)  # (G, B, T, inner)
        conv, norm = self.depthwise, self.batch_norm
        outputs = []
        for g in range(self.groups):
            channels = slice(g * self.inner, (g + 1) * self.inner)
            z = depthwise_frames_last(y[g], conv.weight[channels], conv.bias[channels], conv.dilation[0])
            # BatchNorm over (batch, frames) per channel: the frames-last rows are its (N, C) input as they lie.
            # The running statistics are slices of the module's buffers, updated in place in training.
            z = F.batch_norm(z.reshape(-1, self.inner), norm.running_mean[channels], norm.running_var[channels],
                             norm.weight[channels], norm.bias[channels], self.training, norm.momentum, norm.eps)
            outputs.append(F.silu(z).view_as(y[g]))
        return self.dropout(self.pointwise_out(torch.stack(outputs)))


def depthwise_frames_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilation: int) -> torch.Tensor:
    """A 'same'-padded depthwise convolution of frames-last x (batch, frames, channels) -> (batch, frames, channels),
    weight (channels, 1, kernel) as nn.Conv1d holds it, odd kernel.

    It runs as a 2-D convolution on a channels-last view, oneDNN's fast depthwise kernel on CPU (about 20x faster
    here than Conv1d on the transposed copy). That kernel is slow with dilation, so a dilation d is folded into the
    channels instead: frame t = d*s + p becomes step s of channel (p, c), and the dilated convolution is then an
    undilated one over the steps, with the weights repeated for each phase p (the zero padding matches too).
    """
    batch, frames, channels = x.shape
    steps = -(-frames // dilation)
    if steps * dilation != frames:
        x = F.pad(x, (0, 0, 0, steps * dilation - frames))
    folded = x.reshape(batch, steps, dilation * channels).transpose(1, 2).unsqueeze(2)  # (B, dC, 1, steps) view
    kernel = weight.repeat(dilation, 1, 1).unsqueeze(2)
    y = F.conv2d(folded, kernel, bias.repeat(dilation), padding=(0, weight.shape[-1] // 2), groups=dilation * channels)
    return y.squeeze(2).transpose(1, 2).reshape(batch, steps * dilation, channels)[:, :frames]


class ConformerBlock(nn.Module):
    """Macaron conformer block, wrapped once more as LN(block(x) + x)."""

    def __init__(self, groups: int, dim: int, heads: int, ff_mult: int, conv_expansion: int, conv_kernel: int,
                 dilation: int, dropout: float):
        super().__init__()
        self.ff1 = FeedForward(groups, dim, ff_mult, dropout)
        self.attention_norm = GroupedLayerNorm(groups, dim)
        self.attention = SelfAttention(groups, dim, heads, dropout)
        self.conv = ConvModule(groups, dim, conv_expansion, conv_kernel, dilation, dropout)
        self.ff2 = FeedForward(groups, dim, ff_mult, dropout)
        self.block_norm = GroupedLayerNorm(groups, dim)
        self.outer_norm = GroupedLayerNorm(groups, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + 0.5 * self.ff1(x)
        y = y + self.attention(self.attention_norm(y))
        y = y + self.conv(y)
        y = self.block_norm(y + 0.5 * self.ff2(y))
        return self.outer_norm(y + x)


class ConformerStack(nn.Sequential):
    """`num_blocks` conformer blocks; block i's depthwise convolution is dilated 2^(i mod dilation_cycle)."""

    def __init__(self, groups: int, num_blocks: int, dim: int, heads: int, ff_mult: int, conv_expansion: int,
                 conv_kernel: int, dilation_cycle: int, dropout: float):
        super().__init__(*(ConformerBlock(groups, dim, heads, ff_mult, conv_expansion, conv_kernel,
                                          2 ** (i % dilation_cycle), dropout) for i in range(num_blocks)))


class GroupedBiLSTM(nn.Module):
    """G independent multi-layer bidirectional LSTMs: (G, B, T, input_size) -> (G, B, T, 2 * hidden_size).

    Weights are stacked along the group axis in nn.LSTM's layout (gates i, f, g, o; two biases). No fused LSTM
    kernel accepts a different weight set per batch element, and a time loop written in Python measured 3x slower
    on CPU than the fused kernel, so each group calls the fused kernel (torch.lstm, cuDNN on CUDA) on its own slice.
    """

    def __init__(self, groups: int, input_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.groups, self.hidden_size, self.num_layers = groups, hidden_size, num_layers
        bound = 1 / math.sqrt(hidden_size)  # nn.LSTM's initialisation

        def stacked(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(groups, 2, *shape).uniform_(-bound, bound))

        sizes_in = [input_size] + [2 * hidden_size] * (num_layers - 1)
        self.weight_ih = nn.ParameterList(stacked(4 * hidden_size, size) for size in sizes_in)
        self.weight_hh = nn.ParameterList(stacked(4 * hidden_size, hidden_size) for _ in sizes_in)
        self.bias_ih = nn.ParameterList(stacked(4 * hidden_size) for _ in sizes_in)
        self.bias_hh = nn.ParameterList(stacked(4 * hidden_size) for _ in sizes_in)

    def group_weights(self, g: int) -> list[torch.Tensor]:
        """Group g's weights in the flat order torch.lstm expects (layer-major, then direction)."""
        return [w[layer][g, direction] for layer in range(self.num_layers) for direction in range(2)
                for w in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            # Under CUDA autocast cuDNN's RNN runs in float16 whatever dtype was asked for, and bfloat16 training
            # scales no loss: its gradients would fall below float16's normal range. The recurrence stays float32.
            with torch.autocast("cuda", enabled=False):
                return self.forward(x.float())
        zeros = x.new_zeros(2 * self.num_layers, x.shape[1], self.hidden_size)
        return torch.stack([torch.lstm(x[g], (zeros, zeros), self.group_weights(g), True, self.num_layers, 0.0,
                                       self.training, True, True)[0] for g in range(self.groups)])


def recurrences_left_eager(model: nn.Module) -> nn.Module:
    """The model with its GroupedBiLSTMs kept out of torch.compile's graph; call it before compiling.

    torch.compile would trace torch.lstm as a Python loop over every frame: a graph of thousands of nodes per layer
    that took minutes to compile for the tiny test model, and loses cuDNN's fused kernel. Left eager, the recurrences
    run as they do without compiling and the rest compiles (the tiny model: 4.7 s). Applied per instance rather than
    as a decorator, so that importing the models does not import torch's compiler (a second per process).
    """
    for module in model.modules():
        if isinstance(module, GroupedBiLSTM):
            module.forward = torch.compiler.disable(module.forward)
    return model

