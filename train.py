"""Train the codec (`--stage codec`), ParaGSE (`--stage enhancer`) or the serial baseline (`--stage serial`).

    python train.py --stage codec --config config.json --checkpoint_dir runs/codec --train_dir data/corpus/train
    python train.py --stage enhancer --config config.json --codec runs/codec/checkpoint_00100000.pt \
        --checkpoint_dir runs/paragse --train_degraded_dir VB/noisy_trainset_28spk_wav \
        --train_clean_dir VB/clean_trainset_28spk_wav
    torchrun --nproc_per_node 4 train.py ...   # same arguments, DistributedDataParallel

A run resumes from the newest loadable checkpoint in --checkpoint_dir. SIGINT/SIGTERM save a checkpoint and exit.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from typing import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.tensorboard import SummaryWriter

import dataset as data
from models.codec import Codec
from models.discriminator import MultiResolutionMDCTDiscriminator
from models.losses import LogMel, MultiScaleLogMel, discriminator_hinge_loss, feature_matching_loss, generator_hinge_loss
from models.mdct import bin_correlation
from models.paragse import ParaGSE
from models.serial import SerialEnhancer
from utils import (UserError, count_parameters, find_audio_files, load_audio, load_checkpoint, load_config,
                   load_matching_weights, load_state_dict_checked, resolve_device, rng_state, save_checkpoint,
                   seed_everything, set_rng_state)

log = logging.getLogger("train")
CHECKPOINT_PATTERN = "checkpoint_{:08d}.pt"


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=["codec", "enhancer", "serial"])
    p.add_argument("--config", default="config.json", help="JSON config; partial configs are laid over config.json")
    p.add_argument("--checkpoint_dir", required=True, help="checkpoints, TensorBoard logs and log.csv go here")
    p.add_argument("--codec", help="trained codec checkpoint (enhancer and serial stages)")
    p.add_argument("--init_from", help="start a new run from this checkpoint's weights (same stage and model size; "
                                       "optimiser and step start afresh), e.g. to adapt an enhancer to a retrained "
                                       "codec or a codec to new data")
    data_args = p.add_argument_group("data (folders are searched recursively; any sample rate)")
    data_args.add_argument("--train_dir", help="clean speech (codec; or enhancer with --noise_dir)")
    data_args.add_argument("--valid_dir", help="clean validation speech")
    data_args.add_argument("--train_degraded_dir", help="paired degraded speech, matched to --train_clean_dir")
    data_args.add_argument("--train_clean_dir")
    data_args.add_argument("--valid_degraded_dir")
    data_args.add_argument("--valid_clean_dir")
    data_args.add_argument("--noise_dir", help="noise for on-the-fly degradation of --train_dir / --valid_dir")
    data_args.add_argument("--rir_dir", help="room impulse responses (default: simulated)")
    p.add_argument("--max_steps", type=int, help="stop at this step (default: the config's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--keep_last", type=int, help="checkpoints to keep (default: config run.keep_last)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


# -------------------------------------------------------------------------------------------- distributed
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


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


# ----------------------------------------------------------------------------------------------- sampling
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


# --------------------------------------------------------------------------------------------- schedules
def lr_lambda_codec(train: dict, max_steps: int):
    """Warm-up, exponential decay per epoch, and a linear cool-down to zero over the last `cooldown_steps` before
    `max_steps` (off at 0). The cool-down depends only on where the run stops, so any checkpoint can be cooled down
    by resuming it with a later --max_steps; resuming a cooled run further restarts the learning rate."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / train["warmup_steps"]) if train["warmup_steps"] > 0 else 1.0
        cool = min(1.0, (max_steps - step) / train["cooldown_steps"]) if train["cooldown_steps"] > 0 else 1.0
        return warm * max(0.0, cool) * train["lr_decay_per_epoch"] ** (step // train["steps_per_epoch"])
    return factor


def lr_lambda_enhancer(train: dict, max_steps: int):
    floor = train["min_learning_rate"] / train["learning_rate"]

    def factor(step: int) -> float:
        if step < train["warmup_steps"]:
            return (step + 1) / train["warmup_steps"]
        progress = min(1.0, (step - train["warmup_steps"]) / max(1, max_steps - train["warmup_steps"]))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# ------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(directory: Path) -> list[Path]:
    return sorted(directory.glob("checkpoint_*.pt"))


def load_latest_checkpoint(directory: Path, kind: str) -> dict | None:
    """Newest checkpoint that loads; a corrupt newer one is skipped with a warning."""
    for path in reversed(list_checkpoints(directory)):
        try:
            payload = load_checkpoint(path, kind)
        except UserError as e:
            log.warning("skipping %s", e)
            continue
        log.info("resuming from %s (step %d)", path, payload["step"])
        return payload
    return None


def write_checkpoint(directory: Path, payload: dict, keep_last: int) -> Path:
    path = directory / CHECKPOINT_PATTERN.format(payload["step"])
    save_checkpoint(path, payload)
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
    """Counts consecutive non-finite losses; too many in a row is an error, not something to train through."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def ok(self, loss: torch.Tensor, step: int) -> bool:
        if torch.isfinite(loss).item():
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        log.warning("non-finite loss at step %d: step skipped (%d in a row, %d in total)", step, self.in_a_row,
                    self.total)
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(f"{self.in_a_row} non-finite losses in a row (run.max_nonfinite_steps): stopping; "
                               "lower the learning rate or check the data")
        return False


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
            tmp = self.csv_path.with_suffix(".tmp")
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(kept)
            tmp.replace(self.csv_path)

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
    """The bookkeeping both training loops share: step, compute clock, log, stop request, NaN guard and saving.

    Built right before the loop, after the stage has loaded its weights from `resumed`; it restores the RNG state
    there, so the resumed loop draws exactly what an uninterrupted one would. `save` adds the step, the compute
    seconds and the RNG state to the stage's own payload.
    """

    def __init__(self, args: argparse.Namespace, config: dict, resumed: dict | None, device: torch.device, rank: int,
                 world: int, initial: dict | None = None):
        """`initial`: the --init_from checkpoint of a new run, whose compute time the new run's clock carries on."""
        run = config["run"]
        self.directory, self.rank = Path(args.checkpoint_dir), rank
        self.keep_last = args.keep_last or run["keep_last"]
        self.step = resumed["step"] if resumed else 0
        self._saved_at = self.step if resumed else -1
        if resumed:
            set_rng_state(resumed["rng"])
        self.log = RunLog(self.directory, rank == 0)
        self.log.rewind(self.step)
        self.stop, self.guard = StopRequest(), NonFiniteGuard(run["max_nonfinite_steps"])
        start = resumed or initial or {}
        self.clock = ComputeClock(device, start.get("compute_seconds", 0.0), world)

    def tick(self) -> float:
        """One step done; returns the compute hours so far."""
        self.step += 1
        return self.clock.tick()

    def save(self, payload: dict) -> None:
        self._saved_at = self.step
        if self.rank == 0:
            payload |= {"step": self.step, "compute_seconds": self.clock.seconds, "rng": rng_state()}
            log.info("saved %s", write_checkpoint(self.directory, payload, self.keep_last))

    def finish(self, payload: Callable[[], dict]) -> None:
        """Save the last step unless it was just saved, and close the log."""
        if self._saved_at != self.step:
            self.save(payload())
        self.log.close()


# --------------------------------------------------------------------------------------------------- data
def require_dir(path: str | None, flag: str) -> Path:
    if path is None:
        raise UserError(f"{flag} is required for this stage")
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{flag}: folder not found: {p}")
    if not find_audio_files(p):
        raise UserError(f"{flag}: no .wav/.flac/.ogg files under {p}")
    return p


def training_pairs(args: argparse.Namespace, config: dict, segment_length: int, seed: int) -> Dataset:
    """Paired folders if given, else clean speech with on-the-fly degradation."""
    if args.train_degraded_dir or args.train_clean_dir:
        return data.PairedDataset(require_dir(args.train_degraded_dir, "--train_degraded_dir"),
                                  require_dir(args.train_clean_dir, "--train_clean_dir"), segment_length, seed)
    return data.DegradedDataset(require_dir(args.train_dir, "--train_dir"), require_dir(args.noise_dir, "--noise_dir"),
                                args.rir_dir, config["data"], segment_length, seed)


def validation_pairs(args: argparse.Namespace, config: dict) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """A few fixed whole-file (name, degraded, clean) pairs for validation."""
    count = config["data"]["validation_files"]
    if args.valid_degraded_dir:
        ds = data.PairedDataset(require_dir(args.valid_degraded_dir, "--valid_degraded_dir"),
                                require_dir(args.valid_clean_dir, "--valid_clean_dir"), None, 0)
    elif args.valid_dir and args.noise_dir:
        ds = data.DegradedDataset(require_dir(args.valid_dir, "--valid_dir"), Path(args.noise_dir), args.rir_dir,
                                  config["data"], None, 0)
    else:
        return []
    return [(f"valid{i}", *ds[i]) for i in range(min(count, len(ds)))]


def validation_clean(args: argparse.Namespace, config: dict) -> list[tuple[str, torch.Tensor]]:
    if not args.valid_dir:
        return []
    root = require_dir(args.valid_dir, "--valid_dir")
    chosen = []
    for f in find_audio_files(root):  # the first long-enough files in sorted order: the same set every run
        audio = load_audio(root / f, config["sample_rate"])[0]
        if audio.shape[0] >= config["data"]["validation_min_seconds"] * config["sample_rate"]:
            chosen.append((str(f), torch.from_numpy(audio)))
        if len(chosen) == config["data"]["validation_files"]:
            break
    return chosen


def copy_synthesis_scores(estimate: torch.Tensor, reference: torch.Tensor, sample_rate: int, dnsmos: bool) -> dict:
    from evaluate import score_pair  # imported lazily: scoring pulls in pesq/pystoi/onnxruntime

    return score_pair(estimate.cpu().numpy(), reference.cpu().numpy(), sample_rate, dnsmos=dnsmos)


# ----------------------------------------------------------------------------------------------- codec stage
def train_codec(args: argparse.Namespace, config: dict, rank: int, world: int, device: torch.device) -> None:
    train_cfg, loss_cfg, run_cfg = config["codec"]["train"], config["codec"]["loss"], config["run"]
    max_steps = train_cfg["max_steps"] if args.max_steps is None else args.max_steps

    codec = Codec.from_config(config).to(device)
    # The discriminator and the waveform losses judge a waveform; a log-mel decoder trains on its spectrum alone.
    use_discriminator = 0 <= train_cfg["discriminator_start_step"]
    if codec.output == "log_mel" and (use_discriminator or loss_cfg["multi_scale_mel"] > 0):
        raise UserError("a log-mel decoder (codec.decoder.output) trains without the discriminator and the "
                        "multi-scale mel loss: set codec.train.discriminator_start_step to -1 and "
                        "codec.loss.multi_scale_mel to 0")
    disc = MultiResolutionMDCTDiscriminator(config).to(device)
    opt_g = torch.optim.AdamW(codec.parameters(), train_cfg["learning_rate"], betas=tuple(train_cfg["betas"]),
                              weight_decay=train_cfg["weight_decay"])
    opt_d = torch.optim.AdamW(disc.parameters(), train_cfg["learning_rate"], betas=tuple(train_cfg["betas"]),
                              weight_decay=train_cfg["weight_decay"])
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda_codec(train_cfg, max_steps))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_lambda_codec(train_cfg, max_steps))
    # The discriminator's schedule runs in step with the generator's from step 0, before the discriminator first
    # trains (discriminator_start_step); PyTorch would warn about that on every run.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
    resumed = load_latest_checkpoint(Path(args.checkpoint_dir), "codec")
    if resumed:
        load_state_dict_checked(codec, resumed["model"], "resumed checkpoint")
        disc.load_state_dict(resumed["discriminator"])
        opt_g.load_state_dict(resumed["optimizer_g"])
        opt_d.load_state_dict(resumed["optimizer_d"])
        sched_g.load_state_dict(resumed["scheduler_g"])
        sched_d.load_state_dict(resumed["scheduler_d"])
    initial = None
    fresh_input = fresh_output = not resumed  # what Codec.init_data_statistics sets: weights not loaded
    if not resumed and args.init_from:
        initial = load_checkpoint(args.init_from, "codec")
        if initial["config"]["codec"]["decoder"].get("output", "mdct") == codec.output:
            load_state_dict_checked(codec, initial["model"], args.init_from)
            fresh_input = fresh_output = False
        else:  # a new decoder head on trained weights: everything but the output convolution carries over
            fresh = load_matching_weights(codec, initial["model"])
            fresh_input = False
            if rank == 0:
                log.info("--init_from %s: its decoder outputs another spectrum; %s start afresh", args.init_from,
                         ", ".join(fresh))
        if "discriminator" in initial and use_discriminator:
            load_state_dict_checked(disc, initial["discriminator"], args.init_from)
    if rank == 0:
        log.info("codec: %.2f M parameters (encoder %.2f M, decoder %.2f M), discriminator %.2f M",
                 count_parameters(codec) / 1e6, count_parameters(codec.encoder) / 1e6,
                 count_parameters(codec.decoder) / 1e6, count_parameters(disc) / 1e6)

    log_mel = LogMel.from_config(config).to(device)
    multi_scale_mel = MultiScaleLogMel.from_config(config).to(device) if loss_cfg["multi_scale_mel"] > 0 else None
    train_set = data.CleanSegmentDataset(require_dir(args.train_dir, "--train_dir"), train_cfg["segment_length"],
                                         config["data"]["seed"])
    loader = make_loader(train_set, train_cfg["batch_size"] // world, config["data"]["seed"],
                         resumed["step"] if resumed else 0, rank, world, config["data"]["num_workers"])
    valid = validation_clean(args, config) if rank == 0 else []
    if (fresh_input and codec.input == "log_mel") or (fresh_output and codec.output == "log_mel"):
        codec.eval()
        codec.bypass_quantizer(train_cfg["quantizer_warmup_steps"] > 0)
        codec.init_data_statistics(initialisation_segments(train_set, config, device), fresh_input, fresh_output)
        codec.train()
    if codec.fixed_encoder and fresh_input:  # its latents are final from the start, so are its codebooks
        init_codebooks(codec, train_set, config, device, world)
        if rank == 0:
            log.info("codebooks set by k-means on the fixed encoder's latents of %d training segments",
                     train_cfg["init_segments"])
    if world > 1:
        codec_ddp = DistributedDataParallel(codec, device_ids=[device.index] if device.type == "cuda" else None)
        disc_ddp = DistributedDataParallel(disc, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        codec_ddp, disc_ddp = codec, disc
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def payload() -> dict:
        return codec.checkpoint_payload() | {
            "discriminator": disc.state_dict(), "optimizer_g": opt_g.state_dict(), "optimizer_d": opt_d.state_dict(),
            "scheduler_g": sched_g.state_dict(), "scheduler_d": sched_d.state_dict()}

    codec_ddp.train()
    disc_ddp.train()
    run = TrainingRun(args, config, resumed, device, rank, world, initial)
    for clean in loader:
        if run.step >= max_steps or run.stop.requested:
            break
        codec.bypass_quantizer(run.step < train_cfg["quantizer_warmup_steps"])
        if run.step == train_cfg["quantizer_warmup_steps"] > 0:
            init_codebooks(codec, train_set, config, device, world)
            if rank == 0:
                log.info("step %d: quantiser warm-up over; codebooks set by k-means on the encoder's latents",
                         run.step)
        if 0 <= train_cfg["freeze_tokenizer_step"] <= run.step and not codec.tokenizer_frozen:
            codec.freeze_tokenizer()
            if world > 1:  # DDP must be rebuilt to stop waiting for gradients of the frozen weights
                codec_ddp = DistributedDataParallel(codec, device_ids=[device.index] if device.type == "cuda" else None)
            if rank == 0:
                log.info("step %d: tokenizer frozen (encoder, codebooks); only the decoder trains from here", run.step)
        clean = clean.to(device, non_blocking=True)
        use_gan = use_discriminator and run.step >= train_cfg["discriminator_start_step"]
        with amp:
            mdct, decoded, quantized = codec_ddp(clean)
        decoded = decoded.float()
        recon = codec.mdct.inverse(decoded, clean.shape[-1]) if codec.output == "mdct" else None

        # Discriminator first (real speech vs the detached reconstruction), so the generator below is judged by
        # the updated discriminator and no graph spans an in-place weight update.
        loss_d = torch.zeros((), device=device)
        if use_gan:
            with amp:
                loss_d = loss_cfg["discriminator"] * discriminator_hinge_loss(disc_ddp(clean), disc_ddp(recon.detach()))
            if torch.isfinite(loss_d).item():  # a non-finite step is counted once, by the generator's guard
                opt_d.zero_grad(set_to_none=True)
                loss_d.float().backward()
                torch.nn.utils.clip_grad_norm_(disc.parameters(), train_cfg["grad_clip"])
                opt_d.step()

        # Generator: reconstruction terms always, adversarial terms once the discriminator is on.
        mel_clean = log_mel(clean)
        mel_recon = log_mel(recon) if recon is not None else decoded
        terms = {
            "mel_l1": F.l1_loss(mel_recon, mel_clean),
            "mel_mse": F.mse_loss(mel_recon, mel_clean),
            "codebook": quantized.codebook_loss.float(),
            "commitment": quantized.commitment_loss.float(),
        }
        if recon is not None:
            terms["mdct_mse"] = F.mse_loss(decoded, mdct.float())
        if multi_scale_mel is not None:
            terms["multi_scale_mel"] = multi_scale_mel(recon, clean)
        if use_gan:
            with amp:
                real, fake = disc_ddp(clean), disc_ddp(recon)
            terms["gan"] = generator_hinge_loss(fake).float()
            terms["feature_matching"] = feature_matching_loss(real, fake).float()
        loss_g = sum(loss_cfg[name] * value for name, value in terms.items())
        opt_g.zero_grad(set_to_none=True)
        grad_norm = torch.zeros(())
        if run.guard.ok(loss_g + loss_d.detach(), run.step):
            loss_g.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(codec.parameters(), train_cfg["grad_clip"])
            opt_g.step()
        # Discriminator gradients from the generator loss are never applied; drop them.
        opt_d.zero_grad(set_to_none=True)
        sched_g.step()
        sched_d.step()
        compute_hours = run.tick()

        if rank == 0 and run.step % run_cfg["log_every"] == 0:
            scalars = {f"train/{k}": v.item() for k, v in terms.items()}
            scalars |= {"train/loss_g": loss_g.item(), "train/loss_d": loss_d.item(),
                        "train/grad_norm": float(grad_norm), "train/lr": sched_g.get_last_lr()[0],
                        "train/codebook_usage": codebook_usage(quantized.tokens, codec.codebook_size)}
            run.log.scalars(run.step, scalars, compute_hours)
            log.info("step %d  loss_g %.3f  mel_l1 %.3f  loss_d %.3f  %.2f compute-h", run.step, loss_g.item(),
                     terms["mel_l1"].item(), loss_d.item(), compute_hours)
        if rank == 0 and valid and run.step % run_cfg["validate_every"] == 0:
            validate_codec(codec, valid, log_mel, run.log, run.step, compute_hours, config, device)
            codec.train()
        if run.step % run_cfg["checkpoint_every"] == 0:
            run.save(payload())
    run.finish(payload)


def initialisation_segments(train_set: Dataset, config: dict, device: torch.device) -> torch.Tensor:
    """The `init_segments` training segments that data-dependent initialisation looks at: (segments, samples).

    They come from a stream of their own (seed + 1), so a resumed run draws the same ones as an uninterrupted run,
    and the training stream is not disturbed.
    """
    stream = TrainingStream(train_set, config["data"]["seed"] + 1)
    return torch.stack([stream[i] for i in range(config["codec"]["train"]["init_segments"])]).to(device)


def init_codebooks(codec: Codec, train_set: Dataset, config: dict, device: torch.device, world: int) -> None:
    """k-means codebooks on the encoder's latents of the initialisation segments, the same on every rank."""
    wav = initialisation_segments(train_set, config, device)
    was_training = codec.training
    codec.eval()
    codec.init_codebooks(wav, config["codec"]["train"]["kmeans_iterations"], config["data"]["seed"])
    codec.train(was_training)
    if world > 1:  # identical inputs give near-identical codebooks; make them exactly identical
        for quantizer in codec.quantizer.quantizers:
            dist.broadcast(quantizer.codebook.weight.data, 0)


def codebook_usage(tokens: torch.Tensor, codebook_size: int) -> float:
    """Mean over streams of the fraction of codes used in the batch: a collapse detector."""
    used = [torch.unique(tokens[:, s]).numel() / codebook_size for s in range(tokens.shape[1])]
    return float(np.mean(used))


@torch.inference_mode()
def validate_codec(codec: Codec, valid: list, log_mel: LogMel, run_log: RunLog, step: int, compute_hours: float,
                   config: dict, device: torch.device) -> None:
    codec.eval()
    sums: dict[str, list[float]] = {}
    for i, (name, clean) in enumerate(valid):
        clean = clean.to(device)[None]
        decoded = codec.decode_spectrum(codec.encode(clean))
        recon = codec.synthesise(decoded, clean.shape[-1])
        sums.setdefault("valid/mel_l1", []).append(F.l1_loss(log_mel(recon), log_mel(clean)).item())
        if codec.output == "mdct":
            # Does the decoder reproduce the phase below 1 kHz, or only the magnitudes? (scripts/phase_diagnosis.py)
            correlation = bin_correlation(codec.mdct(codec.pad(clean)), decoded)
            sums.setdefault("valid/mdct_correlation_below_1khz", []).append(
                correlation[: codec.bins_below(1000)].mean().item())
        scores = copy_synthesis_scores(recon[0], clean[0], config["sample_rate"], config["run"]["validation_dnsmos"])
        for key, value in scores.items():
            sums.setdefault(f"valid/{key}", []).append(value)
        if i < 2:
            run_log.audio(step, f"copy_synthesis/{i}", recon[0], config["sample_rate"])
            run_log.spectrogram(step, f"copy_synthesis_mel/{i}", log_mel(recon)[0])
            if step == config["run"]["validate_every"]:
                run_log.audio(step, f"clean/{i}", clean[0], config["sample_rate"])
    means = {k: float(np.nanmean(v)) for k, v in sums.items()}
    run_log.scalars(step, means, compute_hours)
    log.info("validation step %d: %s", step, "  ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in means.items()))


# ------------------------------------------------------------------------------------ enhancer / serial stage
def build_enhancer(stage: str, config: dict, codec: Codec) -> torch.nn.Module:
    if stage == "enhancer":
        return ParaGSE(config, codec.num_streams, codec.codebook_size)
    return SerialEnhancer(config, codec)


def train_enhancer(args: argparse.Namespace, config: dict, rank: int, world: int, device: torch.device) -> None:
    kind = "paragse" if args.stage == "enhancer" else "serial"
    train_cfg, run_cfg = config["enhancer"]["train"], config["run"]
    max_steps = train_cfg["max_steps"] if args.max_steps is None else args.max_steps
    resumed = load_latest_checkpoint(Path(args.checkpoint_dir), kind)
    if resumed:
        codec_payload = resumed["codec"]
        codec = Codec.from_payload(codec_payload, args.checkpoint_dir)
    else:
        if not args.codec:
            raise UserError("--codec CODEC.pt is required to start the enhancer stage")
        codec_payload = load_checkpoint(args.codec, "codec")
        codec = Codec.from_payload(codec_payload, args.codec)
        codec_payload = codec.checkpoint_payload()  # weights and config only, no optimiser state
    expected = "gvq" if kind == "paragse" else "rvq"
    if codec.config["codec"]["quantizer"]["type"] != expected:
        raise UserError(f"--stage {args.stage} needs a '{expected}' codec, got "
                        f"'{codec.config['codec']['quantizer']['type']}'")
    codec = codec.to(device).eval().requires_grad_(False)

    model = build_enhancer(args.stage, config, codec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), train_cfg["learning_rate"], betas=tuple(train_cfg["betas"]),
                                  weight_decay=train_cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_enhancer(train_cfg, max_steps))
    if resumed:
        load_state_dict_checked(model, resumed["model"], "resumed checkpoint")
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
    initial = None
    if not resumed and args.init_from:
        initial = load_checkpoint(args.init_from, kind)
        load_state_dict_checked(model, initial["model"], args.init_from)
    if rank == 0:
        log.info("%s: %.2f M parameters; codec %s streams x %d codes", kind, count_parameters(model) / 1e6,
                 codec.num_streams, codec.codebook_size)

    train_set = training_pairs(args, config, train_cfg["segment_length"], config["data"]["seed"])
    loader = make_loader(train_set, train_cfg["batch_size"] // world, config["data"]["seed"],
                         resumed["step"] if resumed else 0, rank, world, config["data"]["num_workers"])
    valid = validation_pairs(args, config) if rank == 0 else []
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def payload() -> dict:
        return model.checkpoint_payload(codec_payload) | {"optimizer": optimizer.state_dict(),
                                                           "scheduler": scheduler.state_dict()}

    ddp.train()
    run = TrainingRun(args, config, resumed, device, rank, world, initial)
    for degraded, clean in loader:
        if run.step >= max_steps or run.stop.requested:
            break
        degraded, clean = degraded.to(device, non_blocking=True), clean.to(device, non_blocking=True)
        with torch.no_grad():
            degraded_tokens, clean_tokens = codec.encode(degraded), codec.encode(clean)
        with amp:
            teacher = (clean_tokens,) if kind == "serial" else ()  # the serial baseline is teacher-forced
            group_logits = ddp(codec.pad(degraded), degraded_tokens, *teacher)  # (batch, streams, frames, codes)
        loss = token_cross_entropy(group_logits.float(), clean_tokens)
        if run.guard.ok(loss, run.step):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg["grad_clip"])
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            grad_norm = torch.zeros(())
        scheduler.step()
        compute_hours = run.tick()

        if rank == 0 and run.step % run_cfg["log_every"] == 0:
            scalars = {"train/loss": loss.item(), "train/grad_norm": float(grad_norm),
                       "train/lr": scheduler.get_last_lr()[0]}
            scalars |= token_accuracies(group_logits.detach(), clean_tokens, degraded_tokens, "train")
            run.log.scalars(run.step, scalars, compute_hours)
            log.info("step %d  loss %.3f  accuracy %.3f (copying degraded tokens %.3f)  %.2f compute-h", run.step,
                     loss.item(), scalars["train/accuracy"], scalars["train/copy_accuracy"], compute_hours)
        if rank == 0 and valid and run.step % run_cfg["validate_every"] == 0:
            validate_enhancer(model, codec, valid, run.log, run.step, compute_hours, config, device)
            model.train()
        if run.step % run_cfg["checkpoint_every"] == 0:
            run.save(payload())
    run.finish(payload)


def token_cross_entropy(group_logits: torch.Tensor, clean_tokens: torch.Tensor) -> torch.Tensor:
    """Mean over groups of the cross-entropy; logits (batch, streams, frames, codes), tokens (batch, streams, frames)."""
    return F.cross_entropy(group_logits.flatten(0, 2), clean_tokens.flatten())


def token_accuracies(group_logits: torch.Tensor, clean_tokens: torch.Tensor, degraded_tokens: torch.Tensor,
                     prefix: str) -> dict[str, float]:
    """Per-group accuracy of the prediction and of simply copying the degraded tokens (the bar to clear)."""
    predicted = group_logits.argmax(-1)
    out = {f"{prefix}/accuracy": (predicted == clean_tokens).float().mean().item(),
           f"{prefix}/copy_accuracy": (degraded_tokens == clean_tokens).float().mean().item()}
    for g in range(clean_tokens.shape[1]):
        out[f"{prefix}/accuracy_group{g}"] = (predicted[:, g] == clean_tokens[:, g]).float().mean().item()
    return out


@torch.inference_mode()
def validate_enhancer(model: torch.nn.Module, codec: Codec, valid: list, run_log: RunLog, step: int,
                      compute_hours: float, config: dict, device: torch.device) -> None:
    model.eval()
    sums: dict[str, list[float]] = {}
    for i, (name, degraded, clean) in enumerate(valid):
        degraded, clean = degraded.to(device)[None], clean.to(device)[None]
        degraded_tokens, clean_tokens = codec.encode(degraded), codec.encode(clean)
        predicted = model.predict_tokens(codec.pad(degraded), degraded_tokens)
        sums.setdefault("valid/accuracy", []).append((predicted == clean_tokens).float().mean().item())
        sums.setdefault("valid/copy_accuracy", []).append((degraded_tokens == clean_tokens).float().mean().item())
        enhanced = codec.decode(predicted, clean.shape[-1])
        if i < 2:
            run_log.audio(step, f"enhanced/{i}", enhanced[0], config["sample_rate"])
            if step == config["run"]["validate_every"]:
                run_log.audio(step, f"degraded/{i}", degraded[0], config["sample_rate"])
                run_log.audio(step, f"clean/{i}", clean[0], config["sample_rate"])
        scores = copy_synthesis_scores(enhanced[0], clean[0], config["sample_rate"], config["run"]["validation_dnsmos"])
        for key, value in scores.items():
            sums.setdefault(f"valid/{key}", []).append(value)
    means = {k: float(np.nanmean(v)) for k, v in sums.items()}
    run_log.scalars(step, means, compute_hours)
    log.info("validation step %d: %s", step, "  ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in means.items()))


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_config(args.config)
        if args.threads:
            torch.set_num_threads(args.threads)
        rank, world, device = setup_distributed(args.device)
        if rank != 0:
            logging.getLogger().setLevel(logging.WARNING)
        Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        seed_everything(config["data"]["seed"] + rank)
        if args.stage == "codec":
            train_codec(args, config, rank, world, device)
        else:
            train_enhancer(args, config, rank, world, device)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
