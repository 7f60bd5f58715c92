"""Vector quantisers for the codec latent: group VQ (independent streams) and residual VQ (serial streams).

Both map a latent (batch, latent_dim, frames) to tokens (batch, streams, frames) and back, so the codec and the
enhancers treat them alike. With projections (the default), look-up is by cosine similarity (L2-normalised
projected latent against L2-normalised codes), which keeps all codes in play far better than raw Euclidean look-up
when a codec is trained briefly. Without (`codec.quantizer.projection: false`), the codes live in the latent's own
space and look-up is by Euclidean distance: a plain split VQ, for a fixed encoder whose codebooks k-means sets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from utils import UserError


@dataclass
class QuantizerOutput:
    latent: torch.Tensor  # (batch, latent_dim, frames), quantised, straight-through gradients
    tokens: torch.Tensor  # (batch, streams, frames), int64 in [0, codebook_size)
    codebook_loss: torch.Tensor  # scalar: pulls codes towards the encoder outputs
    commitment_loss: torch.Tensor  # scalar: pulls encoder outputs towards their codes


class VectorQuantizer(nn.Module):
    """One codebook: 1x1 projection in, cosine nearest neighbour, straight-through, 1x1 projection out.

    In training, codes whose running use falls below `dead_code_threshold` (uses per batch, exponential moving
    average) are restarted on encoder outputs of the current batch: without this, short CPU runs collapse onto a
    few percent of the codebook.

    While `bypass` is set (the trainer's quantiser warm-up), the projected latent goes straight to the output
    projection: the autoencoder learns a continuous code first, and `kmeans_init` then places the codebook on it.
    """

    bypass = False

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int, dead_code_threshold: float = 0.0,
                 usage_decay: float = 0.99, projection: bool = True):
        super().__init__()
        self.projection = projection
        if projection:
            self.in_proj = weight_norm(nn.Conv1d(input_dim, codebook_dim, 1))
            self.out_proj = weight_norm(nn.Conv1d(codebook_dim, input_dim, 1))
        else:
            self.in_proj, self.out_proj = nn.Identity(), nn.Identity()
            codebook_dim = input_dim
        self.codebook = nn.Embedding(codebook_size, codebook_dim)
        self.dead_code_threshold, self.usage_decay = dead_code_threshold, usage_decay
        self.register_buffer("usage", torch.ones(codebook_size))

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, input_dim, frames) -> (output, tokens (batch, frames), codebook_loss, commitment_loss)."""
        projected = self.in_proj(x)  # (batch, codebook_dim, frames)
        tokens = self.nearest(projected)
        if self.bypass:
            zero = 0.0 * self.codebook.weight.sum()  # keeps the codebook in the graph, as DDP requires
            return self.out_proj(projected), tokens, zero, zero
        codes = self.codebook(tokens).transpose(1, 2)
        codebook_loss = F.mse_loss(codes, projected.detach())
        commitment_loss = F.mse_loss(projected, codes.detach())
        straight_through = projected + (codes - projected).detach()
        if self.training and self.dead_code_threshold > 0:
            self.restart_dead_codes(projected, tokens)
        return self.out_proj(straight_through), tokens, codebook_loss, commitment_loss

    @torch.no_grad()
    def restart_dead_codes(self, projected: torch.Tensor, tokens: torch.Tensor) -> None:
        counts = torch.bincount(tokens.flatten(), minlength=self.usage.shape[0]).float()
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
            counts /= dist.get_world_size()
        self.usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        dead = self.usage < self.dead_code_threshold
        count = int(dead.sum())
        if count == 0:
            return
        candidates = projected.detach().transpose(1, 2).reshape(-1, projected.shape[1])
        picks = torch.randint(candidates.shape[0], (count,), device=candidates.device)
        self.codebook.weight.data[dead] = candidates[picks].to(self.codebook.weight.dtype)
        self.usage[dead] = 1.0
        if distributed:  # every replica must hold the same codebook
            dist.broadcast(self.codebook.weight.data, 0)

    @torch.no_grad()
    def kmeans_init(self, x: torch.Tensor, iterations: int, generator: torch.Generator) -> torch.Tensor:
        """Set the codebook by k-means on the projected x (batch, input_dim, frames); returns the quantised output.

        Assignment is by cosine, as in `nearest`, and each code becomes the plain mean of its members, because the
        code itself (not its direction) replaces the latent on the way out. Empty clusters are reseeded on random
        members, so every code starts in use.
        """
        vectors = self.in_proj(x).transpose(1, 2).reshape(-1, self.codebook.weight.shape[1]).float()
        size = self.codebook.weight.shape[0]

        def picks(count: int) -> torch.Tensor:
            return torch.randint(vectors.shape[0], (count,), generator=generator).to(vectors.device)

        def assign_all(centres: torch.Tensor) -> torch.Tensor:
            # In chunks: a (vectors x codes) matrix of hundreds of MB, allocated afresh in every iteration, costs
            # more in page faults than in arithmetic.
            return torch.cat([self.assign(chunk, centres) for chunk in vectors.split(4096)])

        centres = vectors[picks(size)]
        for _ in range(iterations):
            members = assign_all(centres)
            counts = torch.bincount(members, minlength=size).float()
            sums = torch.zeros_like(centres).index_add_(0, members, vectors)
            empty = counts == 0
            centres = sums / counts.clamp(min=1.0)[:, None]
            centres[empty] = vectors[picks(int(empty.sum()))]
        self.codebook.weight.data.copy_(centres.to(self.codebook.weight.dtype))
        self.usage.fill_(1.0)
        return self.decode(self.nearest(self.in_proj(x)))

    def assign(self, vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """vectors (..., codebook_dim), codes (codebook_size, codebook_dim) -> index of the nearest code (...)."""
        if self.projection:
            return torch.matmul(F.normalize(vectors, dim=-1), F.normalize(codes, dim=-1).t()).argmax(dim=-1)
        # argmin |v - c|^2 = argmax (2 v.c - |c|^2); |v|^2 is the same for every code.
        return (2 * torch.matmul(vectors, codes.t()) - codes.pow(2).sum(dim=-1)).argmax(dim=-1)

    def nearest(self, projected: torch.Tensor) -> torch.Tensor:
        """projected (batch, codebook_dim, frames) -> tokens (batch, frames)."""
        return self.assign(projected.transpose(1, 2), self.codebook.weight)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, frames) -> (batch, input_dim, frames)."""
        return self.out_proj(self.codebook(tokens).transpose(1, 2))

    def decode_expected(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (batch, frames, codebook_size) -> the expected output (batch, input_dim, frames) under them."""
        codes = torch.matmul(probs, self.codebook.weight.to(probs.dtype))  # out_proj is linear: expectation inside
        return self.out_proj(codes.transpose(1, 2).to(self.codebook.weight.dtype))


class GroupVectorQuantizer(nn.Module):
    """Split the latent into `num_groups` channel groups, each with its own VQ: token n sees only group n."""

    def __init__(self, latent_dim: int, num_groups: int, codebook_size: int, codebook_dim: int, **options):
        """options: `VectorQuantizer`'s dead_code_threshold, usage_decay and projection."""
        super().__init__()
        if latent_dim % num_groups:
            raise UserError(f"latent_dim {latent_dim} is not divisible by num_groups {num_groups}")
        self.num_streams = num_groups
        self.codebook_size = codebook_size
        self.group_dim = latent_dim // num_groups
        self.quantizers = nn.ModuleList(
            VectorQuantizer(self.group_dim, codebook_size, codebook_dim, **options) for _ in range(num_groups)
        )

    def forward(self, latent: torch.Tensor) -> QuantizerOutput:
        outputs, tokens, codebook_losses, commitment_losses = [], [], [], []
        for quantizer, group in zip(self.quantizers, latent.split(self.group_dim, dim=1)):
            out, tok, cb, cm = quantizer.quantize(group)
            outputs.append(out)
            tokens.append(tok)
            codebook_losses.append(cb)
            commitment_losses.append(cm)
        return QuantizerOutput(
            torch.cat(outputs, dim=1),
            torch.stack(tokens, dim=1),
            torch.stack(codebook_losses).mean(),
            torch.stack(commitment_losses).mean(),
        )

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, groups, frames) -> latent (batch, latent_dim, frames)."""
        return torch.cat([q.decode(tokens[:, i]) for i, q in enumerate(self.quantizers)], dim=1)

    def decode_expected(self, probs: torch.Tensor) -> torch.Tensor:
        """Per-group token distributions (batch, groups, frames, codebook_size) -> expected latent (batch, latent_dim,
        frames). The groups are independent, so each group's expectation is taken alone."""
        return torch.cat([q.decode_expected(probs[:, i]) for i, q in enumerate(self.quantizers)], dim=1)

    def kmeans_init(self, latent: torch.Tensor, iterations: int, generator: torch.Generator) -> None:
        """Every group's codebook by k-means on its slice of latent (batch, latent_dim, frames)."""
        for quantizer, group in zip(self.quantizers, latent.split(self.group_dim, dim=1)):
            quantizer.kmeans_init(group, iterations, generator)


class ResidualVectorQuantizer(nn.Module):
    """Quantise the whole latent, then each residual in turn: stream k refines streams < k (serial)."""

    def __init__(self, latent_dim: int, num_quantizers: int, codebook_size: int, codebook_dim: int, **options):
        """options: `VectorQuantizer`'s dead_code_threshold, usage_decay and projection."""
        super().__init__()
        self.num_streams = num_quantizers
        self.codebook_size = codebook_size
        self.quantizers = nn.ModuleList(
            VectorQuantizer(latent_dim, codebook_size, codebook_dim, **options) for _ in range(num_quantizers)
        )

    def forward(self, latent: torch.Tensor) -> QuantizerOutput:
        residual = latent
        quantized = torch.zeros_like(latent)
        tokens, codebook_losses, commitment_losses = [], [], []
        for quantizer in self.quantizers:
            out, tok, cb, cm = quantizer.quantize(residual)
            quantized = quantized + out
            residual = residual - out.detach()
            tokens.append(tok)
            codebook_losses.append(cb)
            commitment_losses.append(cm)
        return QuantizerOutput(
            quantized,
            torch.stack(tokens, dim=1),
            torch.stack(codebook_losses).mean(),
            torch.stack(commitment_losses).mean(),
        )

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, quantizers, frames) -> latent (batch, latent_dim, frames)."""
        return sum(self.stream_vectors(tokens[:, k], k) for k in range(self.num_streams))

    def kmeans_init(self, latent: torch.Tensor, iterations: int, generator: torch.Generator) -> None:
        """Each codebook in turn by k-means on the residual the codebooks before it leave of latent."""
        residual = latent
        for quantizer in self.quantizers:
            residual = residual - quantizer.kmeans_init(residual, iterations, generator)

    def stream_vectors(self, tokens: torch.Tensor, stream: int) -> torch.Tensor:
        """Latent contribution of quantiser `stream` for its tokens (batch, frames)."""
        return self.quantizers[stream].decode(tokens)


def set_bypass(quantizer: GroupVectorQuantizer | ResidualVectorQuantizer, bypass: bool) -> None:
    """Pass the continuous latent through every codebook (True) or quantise it (False); see VectorQuantizer."""
    for q in quantizer.quantizers:
        q.bypass = bypass


def build_quantizer(latent_dim: int, config: dict) -> GroupVectorQuantizer | ResidualVectorQuantizer:
    kinds = {"gvq": GroupVectorQuantizer, "rvq": ResidualVectorQuantizer}
    if config["type"] not in kinds:
        raise UserError(f"codec.quantizer.type must be 'gvq' or 'rvq', got '{config['type']}'")
    return kinds[config["type"]](latent_dim, config["num_groups"], config["codebook_size"], config["codebook_dim"],
                                 dead_code_threshold=config["dead_code_threshold"], usage_decay=config["usage_decay"],
                                 projection=config["projection"])
