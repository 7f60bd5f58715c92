"""CPU speed plumbing that the command-line tools and the benchmark switch on; the models know nothing of it.

Importing this module sets libgomp's thread wait policy, so it must come before the first `import torch` of a
process. `enable()` tunes the allocator; `parallelize(predictor)` lets ParaGSE's independent token groups run as
concurrent single-threaded tasks; `run_concurrently` runs independent inference tasks the same way.

Why tasks instead of spreading every operation over all threads: on a small CPU an LSTM step or a small tensor op
is too short for a per-operation thread barrier to pay, and a barrier waits on the slowest thread, which is slow
indeed when another process holds one of the cores. One intra-op thread or two give bit-identical results on these
models, so the task-parallel path changes no output.
"""
from __future__ import annotations

import os

# OpenMP threads spin-wait between operations by default. When another process holds one of the cores, a spinning
# thread burns the time slice its partner needs, and each operation then waits a whole scheduler slice at its
# barrier: measured with a training job on one of two cores, the pipeline ran 2.5-4x slower than with passive
# waiting. libgomp reads this once, when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import ctypes  # noqa: E402  (after the policy: see above)
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from typing import TypeVar  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

T = TypeVar("T")
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters from glibc's malloc.h
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # the largest value glibc accepts on 64-bit systems


def enable() -> bool:
    """Let glibc keep freed memory for reuse instead of handing each large block back to the kernel.

    By default a freed block of activations is unmapped and the next operation's output is mapped and page-faulted
    in afresh, 4 KiB at a time, which is slow in a VM: the whole pipeline ran ~8 % faster without it. Blocks up to
    32 MiB stay in the heap; peak memory is unchanged but is not returned before exit. One arena for every thread:
    the concurrent tasks' worker threads would otherwise each get an arena of their own, whose heaps glibc still
    shrinks and grows again (the paper pipeline on 10 s, from its third call on: 2,000-14,000 page faults a call
    with an arena per thread, none with one; the allocations are few and large, so the shared arena's lock costs
    nothing measurable). Process-wide, so only command-line tools call it, first thing. False off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
                    and libc.mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False


def _single_threaded_worker() -> None:
    """Each pool worker computes with one intra-op thread, so workers never share a barrier."""
    torch.set_num_threads(1)


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_workers
    with _pool_lock:
        if _pool is None or _pool_workers != workers:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="paragse-task", initializer=_single_threaded_worker)
            _pool_workers = workers
        return _pool


def run_concurrently(tasks: Sequence[Callable[[], T]]) -> list[T]:
    """Independent, gradient-free tasks on single-threaded workers, one per intra-op thread; results in order.

    A lone task runs on a worker too: a sequence of small operations is faster on one thread than on several that
    meet at a barrier after each (a Griffin-Lim chunk: 1.6x). With one thread, inside a worker, or while autograd
    records, the tasks run in order on the calling thread.
    """
    if torch.get_num_threads() <= 1 or torch.is_grad_enabled():
        return [task() for task in tasks]
    # Grad mode, inference mode and autocast are thread-local: carry them over.
    inference = torch.is_inference_mode_enabled()
    autocast = torch.is_autocast_enabled("cpu")
    autocast_dtype = torch.get_autocast_dtype("cpu")

    def call(task: Callable[[], T]) -> T:
        with torch.inference_mode(inference), torch.no_grad(), \
                torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast):
            return task()

    futures = [_worker_pool(torch.get_num_threads()).submit(call, task) for task in tasks]
    return [future.result() for future in futures]


def split_groups(groups: int, parts: int) -> list[slice]:
    """`groups` group indices cut into at most `parts` contiguous, nearly equal slices."""
    parts = max(1, min(parts, groups))
    bounds = [round(i * groups / parts) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


class ConcurrentTokenBranches(nn.Module):
    """ParaGSE's token branches cut into one part per thread, the parts run as concurrent tasks (inference only).

    The logits are bit-identical to the uncut module's: each group's computation is the same, only where it runs
    changes.
    """

    def __init__(self, branches: nn.Module, threads: int):
        super().__init__()
        self.num_groups, self.codebook_size = branches.num_groups, branches.codebook_size
        self.parts = split_groups(branches.num_groups, threads)
        self.branches = nn.ModuleList(branches.select(part) for part in self.parts)

    def forward(self, condition: torch.Tensor, degraded_tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat(run_concurrently([
            lambda branch=branch, part=part: branch(condition, degraded_tokens[:, part])
            for branch, part in zip(self.branches, self.parts)]), dim=1)


def parallelize(predictor: nn.Module, threads: int | None = None) -> nn.Module:
    """Let a ParaGSE predictor's independent groups run concurrently, one part per thread (others: unchanged)."""
    threads = threads or torch.get_num_threads()
    branches = getattr(predictor, "token_branches", None)
    if threads > 1 and branches is not None and hasattr(branches, "select"):
        predictor.eval()
        predictor.token_branches = ConcurrentTokenBranches(branches, threads)
    return predictor


def parallelize_vocoder(codec: nn.Module) -> nn.Module:
    """Let a codec's Griffin-Lim run its chunks as concurrent single-threaded tasks (others: unchanged)."""
    vocoder = getattr(codec, "griffin_lim", None)
    if vocoder is not None and hasattr(vocoder, "run_tasks"):
        vocoder.run_tasks = run_concurrently
    return codec
