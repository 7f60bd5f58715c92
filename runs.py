"""The bookkeeping of a training run, apart from what is trained: processes, the data stream, checkpoints in the
run's folder, the compute clock, the log, the stop request and the non-finite guard.

train.py reads top to bottom with these as its vocabulary.
"""
from __future__ import annotations

import csv
import io
import math
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.tensorboard import SummaryWriter

import checkpoint
from utils import UserError, atomic_write, resolve_device, rng_state, set_rng_state

log = logging.getLogger("train")
CHECKPOINT_PATTERN = "checkpoint_{:08d}.pt"


def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); torchrun sets WORLD_SIZE/RANK/LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, resolve_device(device_arg)
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and device_arg != "cpu":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local_rank)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return dist.get_rank(), world_size, device


def on_every_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every torchrun rank (the flag itself when not distributed).

    A decision that changes which collective operations a rank runs (skipping a backward pass on a non-finite loss,
    stopping on a signal) must come out the same on every rank: a rank that skips DDP's gradient all-reduce leaves the
    others waiting in it for ever.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def distributed(module: torch.nn.Module, world: int, device: torch.device) -> torch.nn.Module:
    """The module wrapped for DistributedDataParallel under torchrun (which also makes every rank's weights and
    buffers rank 0's), or itself."""
    if world == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


class TrainingStream(Dataset):
    """Draw k of the training stream is a pure function of (seed, k): a resumed run replays exactly the data an
    uninterrupted run would have seen, whatever the number of workers."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, draw: int):
        index = int(np.random.default_rng([self.seed, draw]).integers(len(self.dataset)))
        self.dataset.set_epoch(draw)  # fresh crop (and degradation) randomness for every draw
        return self.dataset[index]


class StepBatches(Sampler):
    """Batches of draw numbers: step s on rank r takes draws [(s * world + r) * b, ... + b)."""

    def __init__(self, batch_size: int, start_step: int, rank: int, world: int):
        self.batch_size, self.start_step, self.rank, self.world = batch_size, start_step, rank, world

    def __iter__(self):
        step = self.start_step
        while True:
            first = (step * self.world + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
            step += 1

    def __len__(self) -> int:
        return sys.maxsize


def make_loader(ds: Dataset, batch_size: int, seed: int, start_step: int, rank: int, world: int,
                workers: int) -> DataLoader:
    return DataLoader(TrainingStream(ds, seed), batch_sampler=StepBatches(batch_size, start_step, rank, world),
                      num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      # Own generator: otherwise starting the loader draws from the global RNG and a resumed
                      # run would diverge from an uninterrupted one.
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_stop_signals)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which saves a checkpoint and then stops them.

    Ctrl-C and `kill` of a job signal every process of it; a worker dying first would crash the main process
    before it could save.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)



def list_checkpoints(directory: Path) -> list[Path]:
    return sorted(directory.glob("checkpoint_*.pt"))


def load_latest_checkpoint(directory: Path, kind: str, model_class: str) -> dict | None:
    """Newest checkpoint that loads; a corrupt newer one is skipped with a warning.

    A folder holding another model's run is refused before anything is written: resuming there would prune that
    run's checkpoints and rewind its log.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            payload = checkpoint.load(path)
        except UserError as e:
            log.warning("skipping %s", e)
            continue
        held = payload["config"].get("class")
        if payload["kind"] != kind or held != model_class or "training" not in payload:
            what = f"an exported {held}" if "training" not in payload else f"a {held} run"
            raise UserError(f"{directory} holds {what} ({path.name}), not a {model_class} run: give this run a "
                            "--checkpoint_dir of its own (nothing was changed)")
        log.info("resuming from %s (step %d)", path, payload["training"]["step"])
        return payload
    return None


# What a resumed run may change: how it logs, saves and feeds itself, and where it stops. Everything else (models,
# losses, optimiser, schedule, data recipe) is the run's: a resume that changed it would mix two recipes.
RESUMABLE = ("run.", "data.num_workers", "data.validation_files", "codec_training.max_steps",
             "enhancer_training.max_steps")


def check_training_config(config: dict, section: str, world: int) -> None:
    """Refuse, by name, the training settings that would crash mid-run or train on garbage (before any model is
    built; `check_segment_length` once the codec is known)."""
    train, problems = config[section], []
    rate = train["learning_rate"]
    if not (math.isfinite(rate) and rate > 0):
        problems.append(f"{section}.learning_rate must be a positive number, not {rate}")
    betas = train["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        problems.append(f"{section}.betas must be two numbers in [0, 1), not {betas}")
    if train["batch_size"] < world or train["batch_size"] % world:
        problems.append(f"{section}.batch_size ({train['batch_size']}) must be a multiple of the {world} processes")
    problems += [f"run.{key} must be at least 1, not {config['run'][key]}"
                 for key in ("log_every", "validate_every", "checkpoint_every") if config["run"][key] < 1]
    if problems:
        raise UserError("; ".join(problems))


def check_segment_length(config: dict, section: str, padded_length: Callable[[int], int]) -> None:
    length = config[section]["segment_length"]
    if length < 1 or padded_length(length) != length:
        raise UserError(f"{section}.segment_length must be a token-aligned length, e.g. "
                        f"{padded_length(max(length, 1))} (the codec's next one), not {length}")


def changed_keys(old: object, new: object, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [key for name in sorted(set(old) | set(new))
                for key in changed_keys(old.get(name), new.get(name), f"{prefix}{name}.")]
    return [] if old == new else [prefix.rstrip(".")]


def check_resumable(directory: Path, stored: dict, config: dict) -> None:
    """Refuse, by name, a config that changes what a resumed run may not change (see RESUMABLE)."""
    refused = [key for key in changed_keys(stored, config) if not key.startswith(RESUMABLE)]
    if refused:
        raise UserError(f"{directory}: the run there started with other settings: {', '.join(refused[:4])}"
                        f"{' ...' if len(refused) > 4 else ''}; a resume may change only run.*, data.num_workers, "
                        "data.validation_files and max_steps (start a new run with --init_from to change the rest)")


def write_checkpoint(directory: Path, payload: dict, keep_last: int) -> Path:
    path = directory / CHECKPOINT_PATTERN.format(payload["training"]["step"])
    checkpoint.save(path, payload)
    if keep_last > 0:  # 0 keeps them all
        for old in list_checkpoints(directory)[:-keep_last]:
            old.unlink()
    return path


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits cleanly."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning("received %s: saving a checkpoint and stopping", signal.Signals(signum).name)
        self.requested = True


class ComputeClock:
    """Compute seconds spent training, carried across resumes: on CPU, CPU-seconds of this process (all its
    threads) times the number of training processes (`torchrun` ranks do equal work), so a busy or paused machine
    does not inflate the compute-hours axis of the learning curves; wall seconds on GPUs."""

    def __init__(self, device: torch.device, seconds: float = 0.0, processes: int = 1):
        self._now = time.process_time if device.type == "cpu" else time.time
        self._scale = processes if device.type == "cpu" else 1
        self.seconds, self._last = seconds, self._now()

    def tick(self) -> float:
        """Add the time since the last tick; returns the total in hours."""
        now = self._now()
        self.seconds += (now - self._last) * self._scale
        self._last = now
        return self.seconds / 3600


class TrainingDiverged(Exception):
    """Training cannot go on (e.g. the loss stays NaN); reported in one line, exit code 1."""


class NonFiniteGuard:
    """Counts consecutive steps with a non-finite loss or gradient; too many in a row is an error, not something to
    train through."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def ok(self, loss: torch.Tensor, step: int) -> bool:
        if torch.isfinite(loss).item():
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row, %d in total)", step,
                    self.in_a_row, self.total)
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(f"{self.in_a_row} non-finite losses or gradients in a row "
                                   "(run.max_nonfinite_steps): stopping; lower the learning rate or check the data")
        return False


def ensure_finite_weights(module: torch.nn.Module, step: int) -> None:
    """Stop at once (TrainingDiverged, exit 1) when an update left a weight non-finite, before anything is saved."""
    largest = torch.stack([p.detach().abs().amax() for p in module.parameters()])
    if not torch.isfinite(largest).all():  # one device sync for all weights
        raise TrainingDiverged(f"the weights are no longer finite after step {step + 1}: stopping without saving "
                               "them; lower the learning rate (the last checkpoint is intact)")


class RunLog:
    """TensorBoard plus an append-only log.csv (small, committable, easy to plot)."""

    def __init__(self, directory: Path, enabled: bool):
        self.enabled = enabled
        self.csv_path = directory / "log.csv"
        self.writer = SummaryWriter(str(directory / "tensorboard")) if enabled else None

    def rewind(self, step: int) -> None:
        """Drop rows logged after `step`: a run resumed from that checkpoint logs them again, identically."""
        if not (self.enabled and self.csv_path.exists()):
            return
        with open(self.csv_path, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [row for row in rows[1:] if int(row[0]) <= step]
        if len(kept) < len(rows):
            text = io.StringIO()
            csv.writer(text).writerows(kept)
            atomic_write(self.csv_path, text.getvalue().encode())

    def scalars(self, step: int, values: dict[str, float], compute_hours: float) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "compute_hours", "key", "value"])
            for key, value in values.items():
                w.writerow([step, f"{compute_hours:.4f}", key, f"{value:.6g}"])

    def audio(self, step: int, tag: str, wav: torch.Tensor, sample_rate: int) -> None:
        if self.enabled:
            self.writer.add_audio(tag, wav.detach().float().cpu().clamp(-1, 1)[None], step, sample_rate)

    def spectrogram(self, step: int, tag: str, log_mel: torch.Tensor) -> None:
        if self.enabled:
            image = log_mel.detach().float().cpu()
            image = (image - image.min()) / (image.max() - image.min() + 1e-8)
            self.writer.add_image(tag, image.flip(0)[None], step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()




class TrainingRun:
    """Step, compute clock, log, stop request, non-finite guard and saving, for any stage.

    Built right before the loop, after the stage has loaded its weights from `resumed`; it restores the RNG state
    there, so the resumed loop draws exactly what an uninterrupted one would. `save` adds the run's config, step,
    compute seconds and RNG state to the stage's payload, under "training".
    """

    def __init__(self, directory: Path, config: dict, resumed: dict | None, device: torch.device, rank: int,
                 world: int, keep_last: int, initial: dict | None = None):
        """`initial`: the --init_from checkpoint of a new run, whose compute time the new run's clock carries on."""
        self.directory, self.config, self.rank, self.keep_last = directory, config, rank, keep_last
        training = resumed["training"] if resumed else {}
        self.step = training.get("step", 0)
        self._saved_at = self.step if resumed else -1
        if resumed:
            set_rng_state(training["rng"])
        self.log = RunLog(directory, rank == 0)
        self.log.rewind(self.step)
        self.stop, self.guard = StopRequest(), NonFiniteGuard(config["run"]["max_nonfinite_steps"])
        start = training or (initial or {}).get("history") or (initial or {}).get("training") or {}
        self.clock = ComputeClock(device, start.get("compute_seconds", 0.0), world)

    def tick(self) -> float:
        """One step done; returns the compute hours so far."""
        self.step += 1
        return self.clock.tick()

    def save(self, payload: dict) -> None:
        self._saved_at = self.step
        if self.rank == 0:
            payload["training"] |= {"config": self.config, "step": self.step, "compute_seconds": self.clock.seconds,
                                    "rng": rng_state()}
            log.info("saved %s", write_checkpoint(self.directory, payload, self.keep_last))

    def finish(self, payload: Callable[[], dict]) -> None:
        """Save the last step unless it was just saved, and close the log."""
        if self._saved_at != self.step:
            self.save(payload())
        self.log.close()
