"""G-MDCTCodec, the paper's codec: MDCT in, ConvNeXt-v2 encoder, group VQ (or the serial baseline's residual VQ),
ConvNeXt-v2 decoder, MDCT out.

Shapes: wav (batch, samples) -> MDCT (batch, hop, 400 Hz frames) -> latent (batch, latent_dim, 50 Hz frames) ->
tokens (batch, groups, frames) -> latent -> MDCT -> wav.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from models.codec import Codec, CodecOutput
from models.convnext import ConvNeXtTrunk
from models.mdct import MDCT
from models.quantizers import GroupVectorQuantizer, ResidualVectorQuantizer
from utils import UserError

QUANTIZERS = {"gvq": GroupVectorQuantizer, "rvq": ResidualVectorQuantizer}


class MDCTEncoder(nn.Module):
    """MDCT (batch, hop, frames) -> latent (batch, latent_dim, frames / downsample): conv, trunk, strided convs."""

    def __init__(self, input_bins: int, dim: int, intermediate_dim: int, num_blocks: int, kernel_size: int,
                 downsample: int, latent_dim: int):
        super().__init__()
        pad = kernel_size // 2
        self.conv_in = nn.Conv1d(input_bins, dim, kernel_size, padding=pad)
        self.trunk = ConvNeXtTrunk(dim, intermediate_dim, num_blocks, kernel_size)
        self.downsample = weight_norm(nn.Conv1d(dim, dim, kernel_size, stride=downsample, padding=pad))
        self.conv_out = weight_norm(nn.Conv1d(dim, latent_dim, kernel_size, padding=pad))

    def forward(self, mdct: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.downsample(self.trunk(self.conv_in(mdct))))


class MDCTDecoder(nn.Module):
    """Latent (batch, latent_dim, frames) -> MDCT (batch, hop, frames * upsample): convs, upsampling, trunk."""

    def __init__(self, latent_dim: int, dim: int, intermediate_dim: int, num_blocks: int, kernel_size: int,
                 upsample: int, upsample_kernel: int, output_bins: int):
        super().__init__()
        pad = kernel_size // 2
        self.conv_in = weight_norm(nn.Conv1d(latent_dim, dim, kernel_size, padding=pad))
        self.upsample = weight_norm(
            nn.ConvTranspose1d(dim, dim, upsample_kernel, stride=upsample, padding=(upsample_kernel - upsample) // 2)
        )
        self.conv_mid = nn.Conv1d(dim, dim, kernel_size, padding=pad)
        self.trunk = ConvNeXtTrunk(dim, intermediate_dim, num_blocks, kernel_size)
        self.conv_out = weight_norm(nn.Conv1d(dim, output_bins, kernel_size, padding=pad))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.trunk(self.conv_mid(self.upsample(self.conv_in(latent)))))


class MDCTCodec(Codec):
    """The codec of DESIGN.md section 1; `quantizer.type` "gvq" (ParaGSE) or "rvq" (the serial baseline)."""

    tokenizer_keys = ("mdct", "encoder", "quantizer")
    trains_on_waveform = True

    def __init__(self, sample_rate: int, mdct: dict, encoder: dict, decoder: dict, quantizer: dict):
        """mdct: frame_length, hop_length; encoder: MDCTEncoder's arguments but input_bins; decoder: MDCTDecoder's
        but latent_dim, upsample and output_bins (the encoder's); quantizer: type and the quantiser's arguments."""
        super().__init__()
        self.sample_rate = sample_rate
        self.mdct = MDCT(mdct["frame_length"], mdct["hop_length"])
        self.hop_length, self.downsample = mdct["hop_length"], encoder["downsample"]
        self.encoder = MDCTEncoder(self.hop_length, **encoder)
        self.decoder = MDCTDecoder(encoder["latent_dim"], upsample=self.downsample, output_bins=self.hop_length,
                                   **decoder)
        options = dict(quantizer)
        kind = options.pop("type", None)
        if kind not in QUANTIZERS:
            raise UserError(f"codec.quantizer.type must be 'gvq' or 'rvq', not {kind!r}")
        self.quantizer = QUANTIZERS[kind](encoder["latent_dim"], **options)

    def forward(self, wav: torch.Tensor) -> CodecOutput:
        mdct = self.mdct(wav)
        quantized = self.quantizer(self.encoder(mdct))
        decoded = self.decoder(quantized.latent)
        return CodecOutput(decoded, mdct, self.mdct.inverse(decoded.float(), wav.shape[-1]), quantized.tokens,
                           quantized.codebook_loss, quantized.commitment_loss)

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.encoder(self.mdct(self.pad(wav)))).tokens

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)

    def synthesise(self, decoded: torch.Tensor, length: int | None = None) -> torch.Tensor:
        return self.mdct.inverse(decoded, length)

    def code_vectors(self) -> torch.Tensor:
        """Every code's latent contribution per residual stage (stages, codebook_size, latent_dim); residual VQ only."""
        if not isinstance(self.quantizer, ResidualVectorQuantizer):
            raise UserError("the serial baseline needs a residual-VQ codec (codec.quantizer.type 'rvq')")
        return self.quantizer.code_vectors()

    @classmethod
    def is_tokenizer_weight(cls, name: str) -> bool:
        return name.startswith("encoder.") or (name.startswith("quantizer.")
                                               and (".in_proj." in name or ".codebook." in name))
