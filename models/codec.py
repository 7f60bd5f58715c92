"""What every codec offers the enhancers, inference, training and evaluation, and how one is built from its config.

Shapes at the boundary of every codec:
    wav      (batch, samples)            at `sample_rate`; any length (encode pads it to a token-aligned length)
    tokens   (batch, groups, frames)     int64 in [0, codebook_size), `samples_per_token` samples a frame
    probs    (batch, groups, frames, codebook_size)   token distributions, for decoding by expectation
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError


@dataclass
class CodecOutput:
    """What a training step of a codec needs (see train.py's codec stage)."""

    decoded: torch.Tensor  # (batch, bins, spectrum_frames): the decoder's output spectrum
    reference: torch.Tensor  # (batch, bins, spectrum_frames): the same spectrum of the input
    waveform: torch.Tensor | None  # (batch, samples): differentiable reconstruction, or None (trained on spectra)
    tokens: torch.Tensor  # (batch, groups, frames)
    codebook_loss: torch.Tensor  # scalar (zero for fixed codebooks)
    commitment_loss: torch.Tensor  # scalar


class Codec(nn.Module):
    """Base of MDCTCodec and MelCodec: a subclass sets `sample_rate`, `hop_length`, `downsample`, `quantizer` and
    `config` (the section it was built from, with its class and the sample rate), and implements the methods that
    raise NotImplementedError here."""

    sample_rate: int
    hop_length: int  # samples per spectrum frame
    downsample: int  # spectrum frames per token frame
    quantizer: nn.Module
    config: dict
    # The config keys that decide the tokens: enhancers stay valid for any codec that shares them and the weights
    # `is_tokenizer_weight` names.
    tokenizer_keys: tuple[str, ...] = ()
    # Whether `forward` gives a differentiable waveform: the codec then trains on waveform losses and may train
    # against the discriminator; otherwise it trains on its spectrum.
    trains_on_waveform: bool = False

    @property
    def num_groups(self) -> int:
        return self.quantizer.num_groups

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def samples_per_token(self) -> int:
        return self.hop_length * self.downsample

    def padded_length(self, num_samples: int) -> int:
        """Smallest length >= num_samples whose centred spectrum has a whole number of token frames.

        A centred frame sequence of length L has L / hop + 1 frames; token frames need a multiple of `downsample`,
        i.e. L = hop * (downsample * F - 1).
        """
        token_frames = max(1, math.ceil((num_samples + self.hop_length) / self.samples_per_token))
        return self.hop_length * (self.downsample * token_frames - 1)

    def pad(self, wav: torch.Tensor) -> torch.Tensor:
        """Right-pad (batch, samples) with zeros to the next token-aligned length."""
        return F.pad(wav, (0, self.padded_length(wav.shape[-1]) - wav.shape[-1]))

    def forward(self, wav: torch.Tensor) -> CodecOutput:
        """Training pass on token-aligned wav (batch, samples)."""
        raise NotImplementedError

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (batch, samples), any length -> tokens (batch, groups, frames)."""
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """tokens -> wav (batch, length or the token-aligned length)."""
        return self.synthesise(self.decode_latent(self.quantizer.decode(tokens)), length)

    def decode_expected(self, probs: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Token distributions -> wav, from each group's expected codebook vector instead of one token."""
        return self.synthesise(self.decode_latent(self.quantizer.decode_expected(probs)), length)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Quantised latent (batch, latent_dim, frames) -> decoded spectrum (batch, bins, spectrum_frames)."""
        raise NotImplementedError

    def synthesise(self, decoded: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Decoded spectrum -> wav (batch, length or the token-aligned length)."""
        raise NotImplementedError

    def initialise(self, segments: torch.Tensor, kmeans_iterations: int, seed: int) -> str | None:
        """Data-dependent start of a fresh codec from training speech segments (batch, samples), token-aligned.

        Returns a line saying what was set, or None when the codec has no such start.
        """
        return None

    @classmethod
    def is_tokenizer_weight(cls, name: str) -> bool:
        """Whether the state-dict entry `name` decides the tokens."""
        raise NotImplementedError


def _check_keys(cls: type, section: dict, where: str) -> dict:
    """The keyword arguments of `cls` from a config section, refusing unknown and missing keys by name."""
    parameters = inspect.signature(cls.__init__).parameters
    accepted = [name for name in parameters if name != "self"]
    unknown = [key for key in section if key not in accepted]
    missing = [name for name in accepted if name not in section and parameters[name].default is inspect.Parameter.empty]
    if unknown:
        raise UserError(f"unknown config key '{where}.{unknown[0]}' for {cls.__name__} "
                        f"(it takes {', '.join(accepted)})")
    if missing:
        raise UserError(f"config key '{where}.{missing[0]}' is missing for {cls.__name__}")
    return section


def build_from_section(classes: dict[str, type], section: dict, where: str, **extra) -> nn.Module:
    """The model a config section names by its "class", built from that section's other keys (and `extra`)."""
    name = section.get("class")
    if name not in classes:
        raise UserError(f"config key '{where}.class' must be one of {', '.join(classes)}, not {name!r}")
    arguments = {k: v for k, v in section.items() if k != "class"} | extra
    try:
        model = classes[name](**_check_keys(classes[name], arguments, where))
    except TypeError as e:  # a nested section (e.g. quantizer) with a key its part does not take, or without one
        raise UserError(f"config section '{where}' does not fit {name}: {e}") from None
    # What a checkpoint stores to rebuild exactly this model (tensors handed in, like code vectors, are not config).
    model.config = {"class": name} | {k: v for k, v in arguments.items() if not isinstance(v, torch.Tensor)}
    return model


def codec_classes() -> dict[str, type[Codec]]:
    """The codec classes a config may name (imported here because they subclass Codec)."""
    from models.mdct_codec import MDCTCodec
    from models.mel_codec import MelCodec

    return {"MDCTCodec": MDCTCodec, "MelCodec": MelCodec}


def build_codec(section: dict, sample_rate: int | None = None) -> Codec:
    """A fresh codec from its config section (a stored codec config carries its own sample rate)."""
    extra = {} if sample_rate is None else {"sample_rate": sample_rate}
    return build_from_section(codec_classes(), section, "codec", **extra)
