"""Conformer blocks and BiLSTMs with a leading *group* axis: G independent networks evaluated in one call.

Every tensor here is (groups, batch, frames, channels). Each group has its own weights, stacked along the first
axis of every parameter, so ParaGSE's N token branches run as one batched computation instead of a Python loop;
with groups=1 the same modules serve the single degraded-spectrum branch.

Every grouped module also takes an optional `part` (a slice of group indices): the module then runs only those
groups, on a (len(part), batch, frames, channels) input, using views of their weights. At inference this lets
independent groups run as separate tasks on separate cores (`run_concurrently`), each task single-threaded.
On a small CPU that beats splitting every operation over all threads: an LSTM step or a small tensor op is too
short for a per-operation thread barrier to pay, and a barrier waits on the slowest thread, which is slow indeed
when another process holds one of the cores. One intra-op thread or two give bit-identical results on this code,
so the task-parallel path changes no output.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


def _single_threaded_worker() -> None:
    """Pool-thread initialiser: each worker computes with one intra-op thread, so workers never share a barrier.

    torch.set_num_threads sets the calling thread's OpenMP/MKL thread count (and the default for threads that
    start computing later); threads that already computed, like the caller's, keep theirs.
    """
    torch.set_num_threads(1)


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    """The process-wide pool of `workers` single-threaded workers (created on first use, resized on demand)."""
    global _pool, _pool_workers
    with _pool_lock:
        if _pool is None or _pool_workers != workers:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="paragse-task", initializer=_single_threaded_worker)
            _pool_workers = workers
        return _pool


def concurrency() -> int:
    """How many independent tasks may run at once here: the intra-op thread budget, 1 while autograd records.

    Inside a pool worker this is 1, so nested calls run their tasks inline.
    """
    if torch.is_grad_enabled():
        return 1
    return torch.get_num_threads()


def run_concurrently(tasks: Sequence[Callable[[], T]]) -> list[T]:
    """Run independent, gradient-free tasks on single-threaded workers, one per intra-op thread; results in order.

    With one thread (or while autograd records) the tasks simply run in order on the calling thread.
    """
    workers = min(len(tasks), concurrency())
    if workers <= 1:
        return [task() for task in tasks]
    inference = torch.is_inference_mode_enabled()  # grad mode and inference mode are thread-local: carry them over

    def call(task: Callable[[], T]) -> T:
        with torch.inference_mode(inference), torch.no_grad():
            return task()

    pool = _worker_pool(torch.get_num_threads())
    futures = [pool.submit(call, task) for task in tasks]
    return [future.result() for future in futures]


def split_groups(groups: int, parts: int) -> list[slice]:
    """`groups` group indices cut into at most `parts` contiguous, nearly equal slices."""
    parts = max(1, min(parts, groups))
    bounds = [round(i * groups / parts) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


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

    def forward(self, x: torch.Tensor, part: slice | None = None) -> torch.Tensor:
        g, b, t, c = x.shape
        weight = self.weight if part is None else self.weight[part]
        y = torch.bmm(x.reshape(g, b * t, c), weight)
        if self.bias is not None:
            y = y + (self.bias if part is None else self.bias[part])
        return y.view(g, b, t, -1)


class GroupedLayerNorm(nn.Module):
    """LayerNorm over channels with a separate affine transform per group."""

    def __init__(self, groups: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(groups, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(groups, 1, 1, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, part: slice | None = None) -> torch.Tensor:
        weight, bias = (self.weight, self.bias) if part is None else (self.weight[part], self.bias[part])
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * weight + bias


class FeedForward(nn.Module):
    def __init__(self, groups: int, dim: int, mult: int, dropout: float):
        super().__init__()
        self.norm = GroupedLayerNorm(groups, dim)
        self.expand = GroupedLinear(groups, dim, dim * mult)
        self.project = GroupedLinear(groups, dim * mult, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, part: slice | None = None) -> torch.Tensor:
        return self.dropout(self.project(self.dropout(F.silu(self.expand(self.norm(x, part), part))), part))


class SelfAttention(nn.Module):
    """Multi-head self-attention per group (groups folded into the batch for the attention kernel)."""

    def __init__(self, groups: int, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise UserError(f"conformer dim {dim} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = GroupedLinear(groups, dim, 3 * dim)
        self.out = GroupedLinear(groups, dim, dim)

    def forward(self, x: torch.Tensor, part: slice | None = None) -> torch.Tensor:
        g, b, t, c = x.shape
        q, k, v = self.qkv(x, part).view(g * b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(g, b, t, c), part)


class ConvModule(nn.Module):
    """LN, pointwise to 2*expansion*dim, GLU, dilated depthwise conv, BatchNorm, SiLU, pointwise back to dim."""

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

    def forward(self, x: torch.Tensor, part: slice | None = None) -> torch.Tensor:
        g, b, t, _ = x.shape
        y = F.glu(self.pointwise_in(self.norm(x, part), part), dim=-1)  # (G, B, T, inner)
        y = y.permute(1, 0, 3, 2).reshape(b, g * self.inner, t)  # groups side by side as conv channels
        y = F.silu(self._depthwise_batch_norm(y, part))
        y = y.view(b, g, self.inner, t).permute(1, 0, 3, 2)
        return self.dropout(self.pointwise_out(y, part))

    def _depthwise_batch_norm(self, y: torch.Tensor, part: slice | None) -> torch.Tensor:
        """Depthwise conv then BatchNorm over the channels of the groups in `part` (all groups when None)."""
        if part is None:
            return self.batch_norm(self.depthwise(y))
        if self.training:
            raise RuntimeError("running a subset of groups is for inference; BatchNorm statistics need every group")
        rows = slice(part.start * self.inner, part.stop * self.inner)  # group g owns channels g*inner..(g+1)*inner
        conv, norm = self.depthwise, self.batch_norm
        bias = conv.bias[rows] if conv.bias is not None else None
        y = F.conv1d(y, conv.weight[rows], bias, conv.stride, conv.padding, conv.dilation, rows.stop - rows.start)
        return F.batch_norm(y, norm.running_mean[rows], norm.running_var[rows], norm.weight[rows], norm.bias[rows],
                            False, 0.0, norm.eps)


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

    def forward(self, x: torch.Tensor, part: slice | None = None) -> torch.Tensor:
        y = x + 0.5 * self.ff1(x, part)
        y = y + self.attention(self.attention_norm(y, part), part)
        y = y + self.conv(y, part)
        y = self.block_norm(y + 0.5 * self.ff2(y, part), part)
        return self.outer_norm(y + x, part)


class ConformerStack(nn.Sequential):
    def __init__(self, groups: int, num_blocks: int, conformer: dict):
        super().__init__(*(
            ConformerBlock(groups, conformer["dim"], conformer["heads"], conformer["ff_mult"],
                           conformer["conv_expansion"], conformer["conv_kernel"],
                           2 ** (i % conformer["dilation_cycle"]), conformer["dropout"])
            for i in range(num_blocks)
        ))

    def forward(self, x: torch.Tensor, part: slice | None = None) -> torch.Tensor:
        for block in self:
            x = block(x, part)
        return x


class GroupedBiLSTM(nn.Module):
    """G independent multi-layer bidirectional LSTMs: (G, B, T, input_size) -> (G, B, T, 2 * hidden_size).

    Weights are stacked along the group axis in nn.LSTM's layout (gates i, f, g, o; two biases). No fused LSTM
    kernel accepts a different weight set per batch element, and a time loop written in Python measured 3x slower
    on CPU than the fused kernel, so each group calls the fused kernel (torch.lstm, cuDNN on CUDA) on its own slice.

    The recurrence is a chain of small matrix-vector steps: spread over two threads, every step waits on a barrier.
    So at inference with more than one thread the independent recurrences (groups, and for a single group its two
    directions) run as separate single-threaded tasks instead, with bit-identical results. Measured on 2 cores with
    another process busy on one (paper sizes, 501 frames): 4 groups 323 -> 246 ms, 1 group 83 -> 65 ms with
    passive OpenMP waiting; with libgomp's default spin-waiting the fused two-thread calls took 3.5x as long as
    the tasks.
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
        return [w for layer in range(self.num_layers) for d in range(2) for w in self._direction_weights(g, layer, d)]

    def _direction_weights(self, g: int, layer: int, direction: int) -> list[torch.Tensor]:
        return [w[layer][g, direction] for w in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)]

    def forward(self, x: torch.Tensor, part: slice | None = None) -> torch.Tensor:
        """x (len(part) or G, B, T, input_size); `part` picks which groups' weights to use (all when None)."""
        groups = list(range(self.groups)[part] if part is not None else range(self.groups))
        workers = concurrency()
        if workers > 1 and len(groups) >= workers:
            return torch.stack(run_concurrently([lambda i=i, g=g: self._group(x[i], g)
                                                 for i, g in enumerate(groups)]))
        if workers > 1:
            return torch.stack([self._group_by_direction(x[i], g) for i, g in enumerate(groups)])
        return torch.stack([self._group(x[i], g) for i, g in enumerate(groups)])

    def _group(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """Group g's whole stack (every layer, both directions) in one fused call: (B, T, in) -> (B, T, 2H)."""
        zeros = x.new_zeros(2 * self.num_layers, x.shape[0], self.hidden_size)
        return torch.lstm(x, (zeros, zeros), self.group_weights(g), True, self.num_layers, 0.0, self.training,
                          True, True)[0]

    def _group_by_direction(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """Group g layer by layer, its forward and backward recurrences as two concurrent tasks."""
        for layer in range(self.num_layers):
            forward, backward = run_concurrently([lambda: self._direction(x, g, layer, 0),
                                                  lambda: self._direction(x, g, layer, 1)])
            x = torch.cat([forward, backward], dim=-1)  # the layout the fused bidirectional kernel produces
        return x

    def _direction(self, x: torch.Tensor, g: int, layer: int, direction: int) -> torch.Tensor:
        """One layer, one direction of group g; the backward one runs the forward kernel on time-reversed input."""
        zeros = x.new_zeros(1, x.shape[0], self.hidden_size)
        if direction:
            x = x.flip(1)
        y = torch.lstm(x, (zeros, zeros), self._direction_weights(g, layer, direction), True, 1, 0.0, self.training,
                       False, True)[0]
        return y.flip(1) if direction else y
