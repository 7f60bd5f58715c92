"""G-MDCTCodec: MDCT front end, ConvNeXt-v2 encoder/decoder, and a group (or residual) vector quantiser.

Shapes at the boundary:
    wav      (batch, samples)            16 kHz
    mdct     (batch, hop, mdct_frames)   400 frames/s
    analysis (batch, bins, mdct_frames)  what the encoder reads (`codec.encoder.input`): the MDCT (the paper),
                                         or the log-mel of `codec.loss.mel` standardised per band (`analyse`)
    latent   (batch, latent_dim, frames) 50 frames/s: a learned ConvNeXt encoder's output (`codec.encoder.kind`
                                         "convnext"), or the analysis averaged over each token frame ("frame_mean")
    tokens   (batch, streams, frames)    int64 in [0, codebook_size)
    decoded  (batch, bins, mdct_frames)  what the decoder outputs (`codec.decoder.output`): MDCT coefficients
                                         (bins = hop; the paper), or a log-mel spectrogram (bins = n_mels of
                                         `codec.loss.mel`) that Griffin-Lim turns into a waveform
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from models.griffin_lim import MelGriffinLim
from models.losses import LogMel
from models.mdct import MDCT
from models.quantizers import QuantizerOutput, build_quantizer, set_bypass
from utils import UserError, load_checkpoint, load_state_dict_checked, padded_length, save_checkpoint, validate_config

# The config sections that decide the tokens; an enhancer stays valid for any codec that shares them and the weights.
TOKENIZER_SECTIONS = ("mdct", "encoder", "quantizer")


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a (batch, channels, frames) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)

    def forward_frames_last(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, channels, frames) -> normalised (batch, frames, channels), left in that layout."""
        return super().forward(x.transpose(1, 2))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-v2 GRN on (batch, frames, channels): boosts channels with large energy over time."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        relative = energy / (energy.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * relative) + self.beta + x

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function in three passes over x instead of five: x * (1 + gamma * relative) + beta.

        The norm comes from a contiguous sum of squares (linalg.vector_norm over the frame axis walks memory with
        a stride, about 12x slower here) and the affine steps fold into one addcmul. Rounding differs from
        `forward` (relative error ~1e-6), so only paths that tolerate that use it.
        """
        energy = x.square().sum(dim=1, keepdim=True).sqrt_()
        relative = energy / (energy.mean(dim=-1, keepdim=True) + 1e-6)
        return torch.addcmul(self.beta, x, torch.addcmul(torch.ones_like(relative), self.gamma, relative))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, LayerNorm, inverted bottleneck with GELU and GRN, residual; (batch, dim, frames)."""

    def __init__(self, dim: int, intermediate_dim: int, kernel_size: int):
        super().__init__()
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.expand = nn.Linear(dim, intermediate_dim)
        self.grn = GlobalResponseNorm(intermediate_dim)
        self.project = nn.Linear(intermediate_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.depthwise(x).transpose(1, 2))
        y = self.project(self.grn(F.gelu(self.expand(y))))
        return x + y.transpose(1, 2)

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` on a frames-last layout, (batch, frames, dim) -> (batch, frames, dim), without copies.

        The depthwise conv runs as a 2-D conv on a channels-last view, so its output is already (frames, dim)
        in memory for the LayerNorm and the Linears: no transposed copies, and oneDNN's channels-last depthwise
        kernel was faster here than the channels-first one. Rounding differs slightly from `forward`.
        """
        conv = self.depthwise
        y = F.conv2d(x.transpose(1, 2).unsqueeze(2), conv.weight.unsqueeze(2), conv.bias, padding=(0, conv.padding[0]),
                     groups=conv.groups)  # (batch, dim, 1, frames), stored channels-last
        y = self.norm(y.squeeze(2).transpose(1, 2))
        return x + self.project(self.grn.fast_forward(F.gelu(self.expand(y))))


class ConvNeXtStack(nn.Module):
    """LayerNorm, ConvNeXt blocks, LayerNorm, Linear: the trunk shared by encoder and decoder.

    `exact=False` lets gradient-free calls take the blocks' fast path (frames-last layout, fused GRN), whose
    rounding differs by ~1e-6. The encoder keeps the exact path: its output is arg-maxed into tokens, and a
    rounding change could flip a near-tie. The decoder's waveform changes by < 1e-6, far below a 16-bit step.
    Measured on 10 s at the paper size: decoder 0.040 -> 0.029 s per audio second on one core.
    """

    def __init__(self, dim: int, intermediate_dim: int, num_blocks: int, kernel_size: int, exact: bool = True):
        super().__init__()
        self.exact = exact
        self.norm_in = ChannelLayerNorm(dim)
        self.blocks = nn.Sequential(*(ConvNeXtBlock(dim, intermediate_dim, kernel_size) for _ in range(num_blocks)))
        self.norm_out = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.exact and not torch.is_grad_enabled():
            return self._fast_forward(x)
        x = self.blocks(self.norm_in(x))
        return self.linear(self.norm_out(x.transpose(1, 2))).transpose(1, 2)

    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_in.forward_frames_last(x)  # (batch, frames, dim) from here on
        for block in self.blocks:
            x = block.fast_forward(x)
        return self.linear(self.norm_out(x)).transpose(1, 2)


class Encoder(nn.Module):
    """Analysis (batch, input_bins, mdct_frames) -> latent (batch, latent_dim, mdct_frames / downsample).

    The ConvNeXt trunk runs at the MDCT frame rate (the paper) or, with `latent_rate_trunk`, after the downsampling
    at the latent rate: downsample-times cheaper per block, the choice for CPU budgets. The latent-rate strided
    conv then spans two latent frames; the paper's kernel (7) is shorter than its stride (8).
    """

    def __init__(self, input_bins: int, dim: int, intermediate_dim: int, num_blocks: int, kernel_size: int,
                 downsample: int, latent_dim: int, latent_rate_trunk: bool = False):
        super().__init__()
        pad = kernel_size // 2
        self.latent_rate_trunk = latent_rate_trunk
        self.conv_in = nn.Conv1d(input_bins, dim, kernel_size, padding=pad)
        self.trunk = ConvNeXtStack(dim, intermediate_dim, num_blocks, kernel_size)
        if latent_rate_trunk:
            self.downsample = weight_norm(nn.Conv1d(dim, dim, 2 * downsample, stride=downsample,
                                                    padding=downsample // 2))
        else:
            self.downsample = weight_norm(nn.Conv1d(dim, dim, kernel_size, stride=downsample, padding=pad))
        self.conv_out = weight_norm(nn.Conv1d(dim, latent_dim, kernel_size, padding=pad))

    def forward(self, analysis: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(analysis)
        x = self.trunk(self.downsample(x)) if self.latent_rate_trunk else self.downsample(self.trunk(x))
        return self.conv_out(x)


class FrameMeanEncoder(nn.Module):
    """Analysis (batch, bins, mdct_frames) -> its mean over each token frame (batch, bins, mdct_frames / downsample).

    No weights: with a split VQ whose codebooks k-means fits (`codec.quantizer.projection: false`), the tokens are
    fixed before any training, and on held-out speech they carry more than a learned encoder trained for a CPU-hour
    (MODEL_CARD.md).
    """

    def __init__(self, downsample: int):
        super().__init__()
        self.downsample = downsample

    def forward(self, analysis: torch.Tensor) -> torch.Tensor:
        return F.avg_pool1d(analysis, self.downsample)


class Decoder(nn.Module):
    """Latent (batch, latent_dim, frames) -> spectrum (batch, output_bins, frames * upsample).

    The trunk runs after the upsampling, at the MDCT frame rate (the paper), or before it at the latent rate
    (`latent_rate_trunk`; see Encoder).
    """

    def __init__(self, latent_dim: int, dim: int, intermediate_dim: int, num_blocks: int, kernel_size: int,
                 upsample: int, upsample_kernel: int, output_bins: int, latent_rate_trunk: bool = False):
        super().__init__()
        pad = kernel_size // 2
        self.latent_rate_trunk = latent_rate_trunk
        self.conv_in = weight_norm(nn.Conv1d(latent_dim, dim, kernel_size, padding=pad))
        self.upsample = weight_norm(
            nn.ConvTranspose1d(dim, dim, upsample_kernel, stride=upsample, padding=(upsample_kernel - upsample) // 2)
        )
        self.conv_mid = nn.Conv1d(dim, dim, kernel_size, padding=pad)
        self.trunk = ConvNeXtStack(dim, intermediate_dim, num_blocks, kernel_size, exact=False)
        self.conv_out = weight_norm(nn.Conv1d(dim, output_bins, kernel_size, padding=pad))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(latent)
        if self.latent_rate_trunk:
            return self.conv_out(self.conv_mid(self.upsample(self.trunk(x))))
        return self.conv_out(self.trunk(self.conv_mid(self.upsample(x))))


SPECTRA = ("mdct", "log_mel")  # what the encoder may read and the decoder may write
ENCODERS = ("convnext", "frame_mean")


class Codec(nn.Module):
    """The full codec; `config` is the project's complete config dict (its "codec" section is used)."""

    kind = "codec"

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        c = config["codec"]
        enc, dec, mdct = c["encoder"], c["decoder"], c["mdct"]
        self.sample_rate = config["sample_rate"]
        self.hop_length = mdct["hop_length"]
        self.downsample = enc["downsample"]
        self.mdct = MDCT(mdct["frame_length"], mdct["hop_length"])
        self.input, self.output = enc["input"], dec["output"]
        for key, value in (("codec.encoder.input", self.input), ("codec.decoder.output", self.output)):
            if value not in SPECTRA:
                raise UserError(f"{key} must be one of {', '.join(SPECTRA)}, not {value!r}")
        bins = {"mdct": self.hop_length, "log_mel": c["loss"]["mel"]["n_mels"]}
        if "log_mel" in (self.input, self.output) and c["loss"]["mel"]["hop_length"] != self.hop_length:
            raise UserError("a log-mel encoder input or decoder output needs codec.loss.mel.hop_length == "
                            "codec.mdct.hop_length (one mel frame per MDCT frame)")
        if self.input == "log_mel":
            self.analysis_mel = LogMel.from_config(config)
            # Per-band statistics of the training speech (`init_data_statistics`): the encoder reads a standardised
            # log-mel, whose raw values (mean about -5, each band's its own) slow early training down.
            self.register_buffer("analysis_mean", torch.zeros(bins["log_mel"], 1))
            self.register_buffer("analysis_std", torch.ones(bins["log_mel"], 1))
        if self.output == "log_mel":
            self.griffin_lim = MelGriffinLim.from_config(config)
        if enc["kind"] not in ENCODERS:
            raise UserError(f"codec.encoder.kind must be one of {', '.join(ENCODERS)}, not {enc['kind']!r}")
        self.fixed_encoder = enc["kind"] == "frame_mean"
        # The decoder's skip adds the frame means, interpolated back to the MDCT rate, to its output: it starts from
        # the split VQ's own reconstruction and learns only what interpolation misses.
        self.decoder_skip = dec["skip"]
        if self.fixed_encoder and (self.input != "log_mel" or enc["latent_dim"] != bins["log_mel"]
                                   or c["quantizer"]["projection"]):
            raise UserError("codec.encoder.kind 'frame_mean' needs codec.encoder.input 'log_mel', "
                            "codec.encoder.latent_dim == codec.loss.mel.n_mels and codec.quantizer.projection false")
        if self.decoder_skip and not (self.fixed_encoder and self.output == "log_mel"):
            raise UserError("codec.decoder.skip needs codec.encoder.kind 'frame_mean' and codec.decoder.output "
                            "'log_mel' (it adds the decoded frame means to the log-mel)")
        if self.fixed_encoder:
            self.encoder = FrameMeanEncoder(enc["downsample"])
        else:
            self.encoder = Encoder(bins[self.input], enc["dim"], enc["intermediate_dim"], enc["num_blocks"],
                                   enc["kernel_size"], enc["downsample"], enc["latent_dim"], enc["latent_rate_trunk"])
        self.quantizer = build_quantizer(enc["latent_dim"], c["quantizer"])
        self.decoder = Decoder(enc["latent_dim"], dec["dim"], dec["intermediate_dim"], dec["num_blocks"],
                               dec["kernel_size"], enc["downsample"], dec["upsample_kernel"], bins[self.output],
                               dec["latent_rate_trunk"])
        if self.decoder_skip:  # the residual starts at zero: the first output is the skip's, not noise on it
            self.decoder.conv_out.parametrizations.weight.original0.data.zero_()
            self.decoder.conv_out.bias.data.zero_()

    @property
    def num_streams(self) -> int:
        return self.quantizer.num_streams

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def bins_below(self, hz: float) -> int:
        """How many MDCT bins lie wholly below `hz`."""
        return int(hz // (self.sample_rate / 2 / self.hop_length))

    # ------------------------------------------------------------------------------------------ training
    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantizerOutput]:
        """wav (batch, samples) -> (input mdct, decoded spectrum, quantiser output); see the module docstring.

        `samples` must be a token-aligned length (see `utils.padded_length`); training segments are. The
        waveform is left to `synthesise`: a log-mel decoder trains on its spectrum, without Griffin-Lim.
        """
        mdct = self.mdct(wav)
        quantized = self.quantizer(self.encoder(mdct if self.input == "mdct" else self.analyse(wav)))
        return mdct, self.decode_latent(quantized.latent), quantized

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Quantised latent (batch, latent_dim, frames) -> decoded spectrum (batch, bins, mdct_frames)."""
        decoded = self.decoder(latent)
        if self.decoder_skip:
            means = latent * self.analysis_std + self.analysis_mean  # back from the standardised log-mel
            decoded = decoded + F.interpolate(means, size=decoded.shape[-1], mode="linear", align_corners=False)
        return decoded

    @staticmethod
    def is_tokenizer_weight(name: str) -> bool:
        """Whether the state-dict entry `name` decides the tokens (the log-mel input's statistics, encoder,
        quantisers' input projections, codebooks)."""
        return name.startswith(("encoder.", "analysis_")) or (name.startswith("quantizer.")
                                                              and (".in_proj." in name or ".codebook." in name))

    def tokenizer_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if self.is_tokenizer_weight(name)]

    @property
    def tokenizer_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.tokenizer_parameters())

    def freeze_tokenizer(self) -> None:
        """Fix the tokens: only the decoder side trains from now on, so enhancers trained on these tokens stay valid
        for every later decoder. The quantisers stop restarting dead codes (that would change the tokens)."""
        for p in self.tokenizer_parameters():
            p.requires_grad_(False)
        for q in self.quantizer.quantizers:
            q.dead_code_threshold = 0.0

    def analyse(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (batch, samples), token-aligned -> what the encoder reads (batch, bins, mdct_frames)."""
        if self.input == "mdct":
            return self.mdct(wav)
        return (self.analysis_mel(wav) - self.analysis_mean) / self.analysis_std

    def bypass_quantizer(self, bypass: bool) -> None:
        """Quantiser warm-up: the decoder gets the encoder's continuous latent (True) or its quantised tokens."""
        set_bypass(self.quantizer, bypass)

    @torch.no_grad()
    def init_codebooks(self, wav: torch.Tensor, iterations: int, seed: int) -> None:
        """Codebooks by k-means on the encoder's latents of wav (batch, samples), a token-aligned length."""
        latent = torch.cat([self.encoder(self.analyse(chunk)) for chunk in wav.split(256)])
        self.quantizer.kmeans_init(latent, iterations, torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def init_data_statistics(self, wav: torch.Tensor, input_statistics: bool = True, output_bias: bool = True) -> None:
        """Data-dependent start of a fresh codec, from training speech wav (batch, samples), token-aligned.

        A log-mel encoder input is standardised per band with the data's statistics. A log-mel decoder's output
        bias is shifted so that its mean spectrum is the data's: speech log-mel averages about -5 (per band -8 to
        -3) while a fresh decoder outputs about 0, and with Adam's step of ~learning rate per weight, walking the
        bias there alone takes thousands of steps.
        """
        input_statistics &= self.input == "log_mel"
        output_bias &= self.output == "log_mel" and not self.decoder_skip  # the skip already gives the mean
        if not (input_statistics or output_bias):
            return
        log_mel = torch.cat([LogMel.from_config(self.config).to(wav.device)(chunk) for chunk in wav.split(256)])
        if input_statistics:
            self.analysis_mean.copy_(log_mel.mean(dim=(0, 2))[:, None])
            # A band the data never reaches (band-limited speech) sits at the log floor, with no spread at all.
            self.analysis_std.copy_(log_mel.std(dim=(0, 2)).clamp(min=0.1)[:, None])
        if output_bias:
            decoded = self.decode_latent(self.quantizer(self.encoder(self.analyse(wav))).latent)
            self.decoder.conv_out.bias += (log_mel - decoded).mean(dim=(0, 2))

    # ----------------------------------------------------------------------------------------- inference
    def pad(self, wav: torch.Tensor) -> torch.Tensor:
        """Right-pad (batch, samples) with zeros to the next token-aligned length."""
        target = padded_length(wav.shape[-1], self.hop_length, self.downsample)
        return F.pad(wav, (0, target - wav.shape[-1]))

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (batch, samples) of any length -> tokens (batch, streams, ceil((samples + hop) / (hop * downsample)))."""
        return self.quantizer(self.encoder(self.analyse(self.pad(wav)))).tokens

    def tokens_to_latent(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, streams, frames) -> quantised latent (batch, latent_dim, frames)."""
        return self.quantizer.decode(tokens)

    def decode_spectrum(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, streams, frames) -> decoded spectrum (batch, bins, mdct_frames), before synthesis."""
        return self.decode_latent(self.tokens_to_latent(tokens))

    def synthesise(self, decoded: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Decoded spectrum (batch, bins, mdct_frames) -> wav (batch, length or the token-aligned length)."""
        if self.output == "mdct":
            return self.mdct.inverse(decoded, length)
        return self.griffin_lim(decoded, length)

    def decode(self, tokens: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """tokens (batch, streams, frames) -> wav (batch, length or the token-aligned length)."""
        return self.synthesise(self.decode_spectrum(tokens), length)

    def decode_expected(self, probs: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Token distributions (batch, groups, frames, codebook_size) -> wav, from the expected latent instead of
        one token per group (group VQ only: residual stages depend on each other's choices)."""
        if not hasattr(self.quantizer, "decode_expected"):
            raise UserError("expected-value decoding needs a group-VQ codec (codec.quantizer.type 'gvq')")
        return self.synthesise(self.decode_latent(self.quantizer.decode_expected(probs)), length)

    # --------------------------------------------------------------------------------------- persistence
    @classmethod
    def from_config(cls, config: dict) -> "Codec":
        return cls(validate_config(config))

    def checkpoint_payload(self) -> dict:
        return {"kind": self.kind, "config": self.config, "model": self.state_dict()}

    def save(self, path: str | Path) -> None:
        save_checkpoint(path, self.checkpoint_payload())

    @staticmethod
    def tokenizer_digest(payload: dict) -> str:
        """A fingerprint of what decides the tokens (tokenizer config and weights, as float32): two codecs with
        the same digest give the same tokens, whatever their decoders."""
        digest = hashlib.sha256()
        codec_config = payload["config"]["codec"]
        digest.update(json.dumps({k: codec_config[k] for k in TOKENIZER_SECTIONS}, sort_keys=True).encode())
        for key in sorted(filter(Codec.is_tokenizer_weight, payload["model"])):
            digest.update(key.encode())
            digest.update(payload["model"][key].detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @classmethod
    def reference_payload(cls, codec_payload: dict, codec_path: Path, enhancer_path: Path) -> dict:
        """What an enhancer checkpoint at `enhancer_path` stores to name (not carry) the codec `codec_payload`, read
        from `codec_path`."""
        relative = os.path.relpath(Path(codec_path).resolve(), Path(enhancer_path).resolve().parent)
        return {"kind": "codec_reference", "file": Path(relative).as_posix(),
                "tokenizer_sha256": cls.tokenizer_digest(codec_payload)}

    @classmethod
    def from_payload(cls, payload: dict, source: str | Path) -> "Codec":
        """A codec from its payload, or from the file a codec reference names (relative to `source`'s folder)."""
        if payload.get("kind") == "codec_reference":
            path = Path(source).parent / payload["file"]
            if not path.is_file():
                raise UserError(f"{source}: its codec {path} is missing (the enhancer names it instead of carrying it)")
            payload_named = load_checkpoint(path, "codec")
            if cls.tokenizer_digest(payload_named) != payload["tokenizer_sha256"]:
                raise UserError(f"{source}: its codec {path} gives other tokens than the codec it was trained on")
            payload, source = payload_named, path
        codec = cls.from_config(payload["config"])
        load_state_dict_checked(codec, payload["model"], source)
        return codec.eval()

    @classmethod
    def load(cls, path: str | Path) -> "Codec":
        """A codec from a codec checkpoint, or the codec embedded in an enhancer checkpoint."""
        payload = load_checkpoint(path, ("codec", "paragse", "serial"))
        if payload["kind"] != "codec":
            payload = payload["codec"]
        return cls.from_payload(payload, path)
