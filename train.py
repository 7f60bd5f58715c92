"""Train the codec (`--stage codec`), ParaGSE (`--stage enhancer`) or the serial baseline (`--stage serial`).

    python train.py --stage codec --config config.json --checkpoint_dir runs/codec --train_dir data/corpus/train
    python train.py --stage enhancer --config config.json --codec runs/codec/checkpoint_00100000.pt \
        --checkpoint_dir runs/paragse --train_degraded_dir VB/noisy_trainset_28spk_wav \
        --train_clean_dir VB/clean_trainset_28spk_wav
    torchrun --nproc_per_node 4 train.py ...   # same arguments, DistributedDataParallel

One loop serves the three stages; a stage is its model, one training step and one validation. A run resumes from
the newest loadable checkpoint in --checkpoint_dir. SIGINT/SIGTERM save a checkpoint and exit.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset

import checkpoint
import dataset as data
from models import build_codec, build_enhancer
from models.discriminator import MultiResolutionMDCTDiscriminator
from models.log_mel import LogMel
from models.losses import discriminator_hinge_loss, feature_matching_loss, generator_hinge_loss
from runs import (TrainingDiverged, TrainingRun, TrainingStream, check_resumable, check_segment_length,
                  check_training_config, distributed, ensure_finite_weights, load_latest_checkpoint, log,
                  make_loader, on_every_rank, setup_distributed)
from utils import (UserError, argmax, count_parameters, find_audio_files, load_audio, load_config, normalise_level,
                   require_dir, require_writable, seed_everything)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=["codec", "enhancer", "serial"])
    p.add_argument("--config", default="config.json", help="JSON config; partial configs are laid over config.json")
    p.add_argument("--checkpoint_dir", required=True, help="checkpoints, TensorBoard logs and log.csv go here")
    p.add_argument("--codec", help="trained codec checkpoint (enhancer and serial stages)")
    p.add_argument("--init_from", help="start a new run from this checkpoint's weights (same stage and model, "
                                       "or an enhancer whose config adds token-branch layers or a copy prior: "
                                       "checkpoint.GROWABLE; optimiser and step start afresh), e.g. to continue "
                                       "exported weights on another machine or to adapt a model to new data")
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
    p.add_argument("--keep_last", type=int, help="checkpoints to keep, 0 for all (default: config run.keep_last)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    return args


# --------------------------------------------------------------------------------------------------- data
def training_pairs(args: argparse.Namespace, config: dict, segment_length: int) -> Dataset:
    """Paired folders if given, else clean speech with on-the-fly degradation."""
    seed, rate = config["data"]["seed"], config["sample_rate"]
    if args.train_degraded_dir or args.train_clean_dir:
        return data.PairedDataset(require_dir(args.train_degraded_dir, "--train_degraded_dir"),
                                  require_dir(args.train_clean_dir, "--train_clean_dir"), segment_length, seed, rate)
    return data.DegradedDataset(require_dir(args.train_dir, "--train_dir"), require_dir(args.noise_dir, "--noise_dir"),
                                args.rir_dir, config["data"], segment_length, seed, rate)


def validation_pairs(args: argparse.Namespace, config: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few fixed whole-file (degraded, clean) pairs for validating an enhancer."""
    rate = config["sample_rate"]
    if args.valid_degraded_dir:
        ds = data.PairedDataset(require_dir(args.valid_degraded_dir, "--valid_degraded_dir"),
                                require_dir(args.valid_clean_dir, "--valid_clean_dir"), None, 0, rate)
    elif args.valid_dir and args.noise_dir:
        ds = data.DegradedDataset(require_dir(args.valid_dir, "--valid_dir"), Path(args.noise_dir), args.rir_dir,
                                  config["data"], None, 0, rate)
    else:
        return []
    return [ds[i] for i in range(min(config["data"]["validation_files"], len(ds)))]


def validation_clean(args: argparse.Namespace, config: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first long-enough files of --valid_dir in sorted order (the same set every run), as (clean, clean)."""
    if not args.valid_dir:
        return []
    root, rate, chosen = require_dir(args.valid_dir, "--valid_dir"), config["sample_rate"], []
    for f in find_audio_files(root):
        audio = torch.from_numpy(load_audio(root / f, rate)[0])
        if audio.shape[0] >= config["data"]["validation_min_seconds"] * rate:
            chosen.append((audio, audio))
        if len(chosen) == config["data"]["validation_files"]:
            break
    return chosen


def initialisation_segments(train_set: Dataset, config: dict, device: torch.device) -> torch.Tensor:
    """The `init_segments` training segments a codec's data-dependent start looks at: (segments, samples).

    They come from a stream of their own (seed + 1): the same on every rank and in a resumed run, and the training
    stream is not disturbed.
    """
    stream = TrainingStream(train_set, config["data"]["seed"] + 1)
    return torch.stack([stream[i] for i in range(config["codec_training"]["init_segments"])]).to(device)


# ------------------------------------------------------------------------------------------------ stages
def adamw(module: torch.nn.Module, train: dict) -> torch.optim.AdamW:
    return torch.optim.AdamW(module.parameters(), train["learning_rate"], betas=tuple(train["betas"]),
                             weight_decay=train["weight_decay"])


def codec_schedule(train: dict, max_steps: int) -> Callable[[int], float]:
    """Warm-up, exponential decay per epoch, and a linear cool-down to zero over the last `cooldown_steps` before
    `max_steps` (off at 0). The cool-down depends only on where the run stops, so any checkpoint can be cooled down
    by resuming it with a later --max_steps."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / train["warmup_steps"]) if train["warmup_steps"] > 0 else 1.0
        cool = min(1.0, (max_steps - step) / train["cooldown_steps"]) if train["cooldown_steps"] > 0 else 1.0
        return warm * max(0.0, cool) * train["lr_decay_per_epoch"] ** (step // train["steps_per_epoch"])
    return factor


def enhancer_schedule(train: dict, max_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to `min_learning_rate` at `max_steps`."""
    floor = train["min_learning_rate"] / train["learning_rate"]

    def factor(step: int) -> float:
        if step < train["warmup_steps"]:
            return (step + 1) / train["warmup_steps"]
        progress = min(1.0, (step - train["warmup_steps"]) / max(1, max_steps - train["warmup_steps"]))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class Stage:
    """What the stages share: optimiser and scheduler states in and out of a checkpoint's "training"."""

    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]

    def training_state(self) -> dict:
        return {"optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
                "schedulers": {k: v.state_dict() for k, v in self.schedulers.items()}}

    def apply_gradients(self, loss: torch.Tensor, judged: torch.Tensor, optimizer: torch.optim.Optimizer,
                        module: torch.nn.Module, guard: Callable[[torch.Tensor], bool], step: int) -> float:
        """One optimiser step on `loss`, unless `judged` (the step's losses) or the gradients are not finite: the
        guard counts those as skipped steps. Returns the gradient norm before clipping.

        Weights that are no longer finite after the step stop training at once (TrainingDiverged, exit 1), before
        anything is saved: a checkpoint never holds them.
        """
        optimizer.zero_grad(set_to_none=True)
        if not on_every_rank(torch.isfinite(judged).item(), judged.device):  # DDP: every rank skips, or none
            guard(judged.new_tensor(float("nan")))  # one count per step: the loss's, or else the gradient's below
            return 0.0
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), self.train_cfg["grad_clip"])
        if not guard(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            return float(grad_norm)
        optimizer.step()
        ensure_finite_weights(module, step)
        return float(grad_norm)

    def resume_training_state(self, payload: dict) -> None:
        for name, state in payload["training"]["optimizers"].items():
            self.optimizers[name].load_state_dict(state)
        for name, state in payload["training"]["schedulers"].items():
            self.schedulers[name].load_state_dict(state)


class CodecStage(Stage):
    """A codec from its config: reconstruction losses, and the discriminator's once `discriminator_start_step` is
    reached. A codec that trains on spectra (no differentiable waveform: MelCodec) is judged on its spectrum."""

    kind = "codec"

    def __init__(self, config: dict, device: torch.device, world: int, max_steps: int):
        self.train_cfg = config["codec_training"]
        self.loss = self.train_cfg["loss"]
        self.model = build_codec(config["codec"], config["sample_rate"]).to(device)
        self.gan_from = self.train_cfg["discriminator_start_step"]  # -1: never
        if self.gan_from >= 0 and not self.model.trains_on_waveform:
            raise UserError(f"{self.model.config['class']} trains on spectra, without the discriminator: set "
                            "codec_training.discriminator_start_step to -1")
        self.log_mel = LogMel(config["sample_rate"], **self.loss["mel"]).to(device)
        self.optimizers = {"generator": adamw(self.model, self.train_cfg)}
        self.discriminator = None
        if self.gan_from >= 0:
            self.discriminator = MultiResolutionMDCTDiscriminator(**self.train_cfg["discriminator"]).to(device)
            self.optimizers["discriminator"] = adamw(self.discriminator, self.train_cfg)
        self.schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, codec_schedule(self.train_cfg, max_steps))
                           for name, opt in self.optimizers.items()}
        # The discriminator's schedule runs in step with the generator's from step 0, before the discriminator
        # first trains; PyTorch would warn about that on every run.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        self.device, self.world = device, world

    def describe(self) -> str:
        line = (f"{self.model.config['class']}: {count_parameters(self.model) / 1e6:.2f} M parameters, "
                f"{self.model.num_groups} groups x {self.model.codebook_size} codes")
        if self.discriminator is not None:
            line += f"; discriminator {count_parameters(self.discriminator) / 1e6:.2f} M"
        return line

    def start(self, train_set: Dataset, config: dict) -> None:
        """A fresh codec's data-dependent start (MelCodec: statistics and k-means), then the DDP wrappers."""
        self.model.eval()
        done = self.model.initialise(initialisation_segments(train_set, config, self.device),
                                     self.train_cfg["kmeans_iterations"], config["data"]["seed"])
        if done:
            log.info("data-dependent start: %s", done)

    def wrap(self) -> None:
        self.model_ddp = distributed(self.model, self.world, self.device).train()
        if self.discriminator is not None:
            self.discriminator_ddp = distributed(self.discriminator, self.world, self.device).train()

    def step(self, clean: torch.Tensor, step: int, amp, guard: Callable[[torch.Tensor], bool]) -> dict[str, float]:
        with amp:
            out = self.model_ddp(clean)
        use_gan = 0 <= self.gan_from <= step
        opt_g, opt_d = self.optimizers["generator"], self.optimizers.get("discriminator")
        # Discriminator first (real speech against the detached reconstruction), so the generator below is judged
        # by the updated discriminator and no graph spans an in-place weight update.
        loss_d = torch.zeros((), device=clean.device)
        if use_gan:
            with amp:
                loss_d = self.loss["discriminator"] * discriminator_hinge_loss(
                    self.discriminator_ddp(clean), self.discriminator_ddp(out.waveform.detach()))
            # A non-finite step is counted once, by the generator's guard; under DDP every rank skips it alike.
            if on_every_rank(torch.isfinite(loss_d).item(), loss_d.device):
                opt_d.zero_grad(set_to_none=True)
                loss_d.float().backward()
                torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.train_cfg["grad_clip"])
                opt_d.step()
                ensure_finite_weights(self.discriminator, step)
        if out.waveform is not None:  # judged on the waveform it makes
            mel_estimate, mel_clean = self.log_mel(out.waveform), self.log_mel(clean)
        else:  # judged on its spectrum: the log-mel it decodes against the input's
            mel_estimate, mel_clean = out.decoded.float(), out.reference.float()
        terms = {"mel_l1": F.l1_loss(mel_estimate, mel_clean), "mel_mse": F.mse_loss(mel_estimate, mel_clean)}
        if out.waveform is not None:
            terms |= {"mdct_mse": F.mse_loss(out.decoded.float(), out.reference.float()),
                      "codebook": out.codebook_loss.float(), "commitment": out.commitment_loss.float()}
        if use_gan:
            with amp:
                real, fake = self.discriminator_ddp(clean), self.discriminator_ddp(out.waveform)
            terms |= {"gan": generator_hinge_loss(fake).float(), "feature_matching": feature_matching_loss(real, fake)}
        loss_g = sum(self.loss[name] * value for name, value in terms.items())
        grad_norm = self.apply_gradients(loss_g, loss_g + loss_d.detach(), opt_g, self.model, guard, step)
        if opt_d is not None:
            opt_d.zero_grad(set_to_none=True)  # the generator loss's discriminator gradients are never applied
        for scheduler in self.schedulers.values():
            scheduler.step()
        used = [torch.unique(out.tokens[:, g]).numel() / self.model.codebook_size for g in range(out.tokens.shape[1])]
        return {**{k: v.item() for k, v in terms.items()}, "loss_g": loss_g.item(), "loss_d": loss_d.item(),
                "grad_norm": grad_norm, "lr": self.schedulers["generator"].get_last_lr()[0],
                "codebook_usage": float(np.mean(used))}

    @torch.inference_mode()
    def validate_one(self, clean: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, dict]:
        recon = self.model.decode(self.model.encode(clean[None]), clean.shape[-1])[0]
        return recon, {"mel_l1": F.l1_loss(self.log_mel(recon[None]), self.log_mel(reference[None])).item()}

    def payload(self) -> dict:
        training = self.training_state()
        if self.discriminator is not None:
            training["discriminator"] = self.discriminator.state_dict()
        return checkpoint.codec_payload(self.model) | {"training": training}

    def resume(self, payload: dict, source: str) -> None:
        checkpoint.load_weights(self.model, payload, source)
        if self.discriminator is not None:
            self.discriminator.load_state_dict(payload["training"]["discriminator"])
        self.resume_training_state(payload)


class EnhancerStage(Stage):
    """A token predictor on a frozen codec: cross-entropy of the clean tokens, mean over groups. The serial
    baseline is teacher-forced on the clean tokens of the stages before each. Every degraded input is brought to
    inference.input_level_db, as inference.py does, and its clean target by the same gain."""

    kind = "enhancer"

    def __init__(self, config: dict, device: torch.device, world: int, max_steps: int, codec_payload: dict,
                 codec_source: str):
        self.train_cfg = config["enhancer_training"]
        self.codec_payload = codec_payload
        self.codec = checkpoint.codec_from_payload(codec_payload, codec_source).to(device).requires_grad_(False)
        self.model = build_enhancer(config["enhancer"], self.codec).to(device)
        self.teacher_forced = config["enhancer"]["class"] == "SerialEnhancer"
        # Beside the paper's cross-entropy, optionally the squared distance between the codebook vectors expected
        # under the predicted distributions and the clean tokens' vectors: what decoding by expectation decodes.
        self.expected_weight = float(self.train_cfg["expected_latent_weight"])
        if not (math.isfinite(self.expected_weight) and self.expected_weight >= 0):
            raise UserError(f"enhancer_training.expected_latent_weight must be 0 or more, not {self.expected_weight}")
        if self.expected_weight and self.teacher_forced:
            raise UserError("enhancer_training.expected_latent_weight needs independent token groups (ParaGSE); "
                            "set it to 0 for the serial baseline")
        self.optimizers = {"enhancer": adamw(self.model, self.train_cfg)}
        self.schedulers = {"enhancer": torch.optim.lr_scheduler.LambdaLR(
            self.optimizers["enhancer"], enhancer_schedule(self.train_cfg, max_steps))}
        self.inference = config["inference"]
        self.device, self.world = device, world

    def describe(self) -> str:
        return (f"{self.model.config['class']}: {count_parameters(self.model) / 1e6:.2f} M parameters; codec "
                f"{self.codec.config['class']}, {self.codec.num_groups} groups x {self.codec.codebook_size} codes")

    def start(self, train_set: Dataset, config: dict) -> None:
        pass

    def wrap(self) -> None:
        self.model_ddp = distributed(self.model, self.world, self.device)
        self.model.train()

    def level(self, degraded: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(degraded at the inference level, clean scaled alike, the gain); both without DC offset."""
        degraded, gain = normalise_level(degraded, self.inference["input_level_db"], self.codec.sample_rate)
        return degraded, (clean - clean.mean(dim=-1, keepdim=True)) * gain, gain

    def step(self, batch: tuple[torch.Tensor, torch.Tensor], step: int, amp,
             guard: Callable[[torch.Tensor], bool]) -> dict[str, float]:
        degraded, clean, _ = self.level(*batch)
        with torch.no_grad():
            degraded_tokens, clean_tokens = self.codec.encode(degraded), self.codec.encode(clean)
        with amp:
            teacher = (clean_tokens,) if self.teacher_forced else ()
            group_logits = self.model_ddp(self.codec.pad(degraded), degraded_tokens, *teacher)
        loss = F.cross_entropy(group_logits.float().flatten(0, 2), clean_tokens.flatten())
        extra = {}
        if self.expected_weight:
            expected = self.codec.quantizer.decode_expected(group_logits.float().softmax(dim=-1))
            with torch.no_grad():
                target = self.codec.quantizer.decode(clean_tokens)
            latent_mse = F.mse_loss(expected, target)
            extra["latent_mse"] = latent_mse.item()
            loss = loss + self.expected_weight * latent_mse
        grad_norm = self.apply_gradients(loss, loss, self.optimizers["enhancer"], self.model, guard, step)
        self.schedulers["enhancer"].step()
        return {"loss": loss.item(), "grad_norm": grad_norm, "lr": self.schedulers["enhancer"].get_last_lr()[0],
                **extra, **token_accuracies(argmax(group_logits.detach()), clean_tokens, degraded_tokens)}

    @torch.inference_mode()
    def validate_one(self, degraded: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, dict]:
        degraded, clean, gain = self.level(degraded[None], clean[None])
        degraded_tokens, clean_tokens = self.codec.encode(degraded), self.codec.encode(clean)
        group_logits = self.model.predict(self.model.condition(self.codec.pad(degraded)), degraded_tokens)
        predicted = argmax(group_logits)
        accuracies = token_accuracies(predicted, clean_tokens, degraded_tokens)
        enhanced = self.codec.decode(predicted, clean.shape[-1])[0] / gain[0]  # the input's level back
        return enhanced, {k: accuracies[k] for k in ("accuracy", "copy_accuracy")}

    def payload(self) -> dict:
        training = self.training_state()
        return checkpoint.enhancer_payload(self.model, self.codec_payload, self.inference) | {"training": training}

    def resume(self, payload: dict, source: str) -> None:
        checkpoint.load_weights(self.model, payload, source)
        self.resume_training_state(payload)


def token_accuracies(predicted: torch.Tensor, clean_tokens: torch.Tensor,
                     degraded_tokens: torch.Tensor) -> dict[str, float]:
    """Per-group accuracy of the prediction, and of simply copying the degraded tokens (the bar to clear)."""
    out = {"accuracy": (predicted == clean_tokens).float().mean().item(),
           "copy_accuracy": (degraded_tokens == clean_tokens).float().mean().item()}
    for g in range(clean_tokens.shape[1]):
        out[f"accuracy_group{g}"] = (predicted[:, g] == clean_tokens[:, g]).float().mean().item()
    return out


# -------------------------------------------------------------------------------------------------- loop
def validate(stage: CodecStage | EnhancerStage, pairs: list, run: TrainingRun, compute_hours: float,
             config: dict) -> None:
    """Scores of the stage's output for every (input, reference) pair; audio of the first two to TensorBoard."""
    from metrics import score_pair  # imported lazily: scoring pulls in pesq, pystoi and onnxruntime

    stage.model.eval()
    rate, sums = config["sample_rate"], {}
    for i, (source, reference) in enumerate(pairs):
        source, reference = source.to(stage.device), reference.to(stage.device)
        output, extra = stage.validate_one(source, reference)
        scores = score_pair(output.cpu().numpy(), reference.cpu().numpy(), rate,
                            dnsmos=config["run"]["validation_dnsmos"])
        for key, value in (extra | scores).items():
            sums.setdefault(f"valid/{key}", []).append(value)
        if i < 2:
            run.log.audio(run.step, f"output/{i}", output, rate)
            if run.step == config["run"]["validate_every"]:
                run.log.audio(run.step, f"input/{i}", source, rate)
    means = {k: float(np.nanmean(v)) for k, v in sums.items()}
    run.log.scalars(run.step, means, compute_hours)
    log.info("validation step %d: %s", run.step, "  ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in means.items()))
    stage.model.train()


def train(args: argparse.Namespace, config: dict, rank: int, world: int, device: torch.device) -> None:
    directory = require_writable(args.checkpoint_dir, "--checkpoint_dir") if rank == 0 else Path(args.checkpoint_dir)
    kind = "codec" if args.stage == "codec" else "enhancer"
    stage_cfg = config["codec_training" if kind == "codec" else "enhancer_training"]
    max_steps = stage_cfg["max_steps"] if args.max_steps is None else args.max_steps
    if max_steps < 0:  # 0 writes the starting point's checkpoint and trains nothing
        raise UserError(f"--max_steps must be 0 or more, not {max_steps}")
    check_training_config(config, f"{kind}_training", world)
    if kind == "enhancer" and (config["enhancer"]["class"] == "SerialEnhancer") != (args.stage == "serial"):
        raise UserError(f"--stage {args.stage} does not train a {config['enhancer']['class']} (enhancer.class): "
                        "--stage serial trains the SerialEnhancer, --stage enhancer ParaGSE")
    model_class = config["codec" if kind == "codec" else "enhancer"]["class"]
    keep_last = config["run"]["keep_last"] if args.keep_last is None else args.keep_last
    if keep_last < 0:
        raise UserError(f"--keep_last (run.keep_last) must be 0 (keep every checkpoint) or more, not {keep_last}")
    if rank == 0:  # what a killed write (kill -9 mid-save) left behind; the checkpoints themselves are whole
        for stale in directory.glob(".checkpoint_*.tmp"):
            stale.unlink()
            log.warning("removed %s, left by an interrupted checkpoint write", stale.name)
    resumed = load_latest_checkpoint(directory, kind, model_class)
    if resumed:
        check_resumable(directory, resumed["training"]["config"], config)
    initial = checkpoint.load(args.init_from, kind) if args.init_from and not resumed else None

    if kind == "codec":
        stage = CodecStage(config, device, world, max_steps)
        train_set = data.CleanSegmentDataset(require_dir(args.train_dir, "--train_dir"), stage_cfg["segment_length"],
                                             config["data"]["seed"], config["sample_rate"])
        valid = validation_clean(args, config) if rank == 0 else []
    else:
        if resumed:
            codec_payload, codec_source = resumed["codec"], args.checkpoint_dir
        elif args.codec:  # also with --init_from: its weights carried onto this codec
            codec_payload, codec_source = checkpoint.load(args.codec, "codec"), args.codec
            codec_payload = {k: codec_payload[k] for k in ("format", "kind", "config", "model")}
        elif initial:  # the codec it names is found beside it
            codec_payload, codec_source = initial["codec"], args.init_from
        else:
            raise UserError("--codec CODEC.pt is required to start the enhancer and serial stages")
        stage = EnhancerStage(config, device, world, max_steps, *checkpoint.resolve_codec(codec_payload, codec_source))
        train_set = training_pairs(args, config, stage_cfg["segment_length"])
        valid = validation_pairs(args, config) if rank == 0 else []
    check_segment_length(config, f"{kind}_training", (stage.model if kind == "codec" else stage.codec).padded_length)
    if resumed:
        stage.resume(resumed, "resumed checkpoint")
    elif initial:
        fresh = checkpoint.load_weights(stage.model, initial, args.init_from, grown=True)
        if fresh and rank == 0:
            log.info("parts new to %s start from their initialisation: %s", args.init_from, ", ".join(fresh))
    else:
        stage.start(train_set, config)
    stage.wrap()
    if rank == 0:
        log.info("%s", stage.describe())

    loader = make_loader(train_set, stage_cfg["batch_size"] // world, config["data"]["seed"],
                         resumed["training"]["step"] if resumed else 0, rank, world, config["data"]["num_workers"])
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    run = TrainingRun(directory, config, resumed, device, rank, world, keep_last, initial)
    if run.step >= max_steps > 0 and rank == 0:
        log.info("the run is already at step %d, at or past --max_steps %d: nothing to train", run.step, max_steps)
    for batch in loader:
        # A signal reaches the ranks at slightly different steps: all stop at the first step any of them saw it.
        if run.step >= max_steps or not on_every_rank(not run.stop.requested, device):
            break
        batch = [b.to(device, non_blocking=True) for b in batch] if isinstance(batch, list) else \
            batch.to(device, non_blocking=True)
        scalars = stage.step(batch, run.step, amp, lambda loss: run.guard.ok(loss, run.step))
        compute_hours = run.tick()
        if rank == 0 and run.step % config["run"]["log_every"] == 0:
            run.log.scalars(run.step, {f"train/{k}": v for k, v in scalars.items()}, compute_hours)
            log.info("step %d  %s  %.2f compute-h", run.step,
                     "  ".join(f"{k} {scalars[k]:.3f}" for k in ("loss", "loss_g", "mel_l1", "accuracy",
                                                                 "copy_accuracy") if k in scalars), compute_hours)
        if rank == 0 and valid and run.step % config["run"]["validate_every"] == 0:
            validate(stage, valid, run, compute_hours, config)
        if run.step % config["run"]["checkpoint_every"] == 0:
            run.save(stage.payload())
    run.finish(stage.payload)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_config(args.config)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        rank, world, device = setup_distributed(args.device)
        if rank != 0:
            logging.getLogger().setLevel(logging.WARNING)
        if Path(args.checkpoint_dir).exists() and not Path(args.checkpoint_dir).is_dir():
            raise UserError(f"--checkpoint_dir {args.checkpoint_dir} is a file, not a folder")
        Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        seed_everything(config["data"]["seed"] + rank)
        train(args, config, rank, world, device)
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
