"""Vector quantisers: group VQ (independent token groups, the paper's GVQ), residual VQ (the serial baseline's
stages) and split VQ (the demo codec's fixed codebooks).

All map a latent (batch, latent_dim, frames) to tokens (batch, groups, frames) and back. For the residual VQ the
token axis holds its stages, which depend on each other; it is still called the group axis, so that codecs and
enhancers treat every quantiser alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from utils import UserError, argmax


@dataclass
class QuantizerOutput:
    latent: torch.Tensor  # (batch, latent_dim, frames), quantised, straight-through gradients
    tokens: torch.Tensor  # (batch, groups, frames), int64 in [0, codebook_size)
    codebook_loss: torch.Tensor  # scalar: pulls codes towards the encoder outputs
    commitment_loss: torch.Tensor  # scalar: pulls encoder outputs towards their codes


class VectorQuantizer(nn.Module):
    """One codebook: 1x1 projection in, cosine nearest neighbour, straight-through, 1x1 projection out.

    Look-up is by cosine similarity (L2-normalised projected latent against L2-normalised codes), which keeps far
    more codes in play than Euclidean look-up when a codec trains briefly. In training, codes whose running use falls
    below `dead_code_threshold` (uses per batch, exponential moving average) restart on encoder outputs of the batch:
    without this, short runs collapse onto a few percent of the codebook.
    """

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int, dead_code_threshold: float,
                 usage_decay: float):
        super().__init__()
        self.in_proj = weight_norm(nn.Conv1d(input_dim, codebook_dim, 1))
        self.out_proj = weight_norm(nn.Conv1d(codebook_dim, input_dim, 1))
        self.codebook = nn.Embedding(codebook_size, codebook_dim)
        self.dead_code_threshold, self.usage_decay = dead_code_threshold, usage_decay
        self.register_buffer("usage", torch.ones(codebook_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, input_dim, frames) -> (output, tokens (batch, frames), codebook_loss, commitment_loss)."""
        projected = self.in_proj(x)  # (batch, codebook_dim, frames)
        tokens = argmax(torch.matmul(F.normalize(projected.transpose(1, 2), dim=-1),
                              F.normalize(self.codebook.weight, dim=-1).t()))
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

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, frames) -> (batch, input_dim, frames)."""
        return self.out_proj(self.codebook(tokens).transpose(1, 2))

    def decode_expected(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (batch, frames, codebook_size) -> the expected output (batch, input_dim, frames) under them."""
        codes = torch.matmul(probs, self.codebook.weight.to(probs.dtype))  # out_proj is linear: expectation inside
        return self.out_proj(codes.transpose(1, 2).to(self.codebook.weight.dtype))


def _merge(outputs: list, latent: torch.Tensor) -> QuantizerOutput:
    return QuantizerOutput(latent, torch.stack([o[1] for o in outputs], dim=1),
                           torch.stack([o[2] for o in outputs]).mean(), torch.stack([o[3] for o in outputs]).mean())


class GroupVectorQuantizer(nn.Module):
    """The latent's channels in `num_groups` groups, each with its own VQ: token group n sees only latent group n."""

    def __init__(self, latent_dim: int, num_groups: int, codebook_size: int, codebook_dim: int,
                 dead_code_threshold: float, usage_decay: float):
        super().__init__()
        if latent_dim % num_groups:
            raise UserError(f"latent_dim {latent_dim} is not divisible by num_groups {num_groups}")
        self.num_groups, self.codebook_size = num_groups, codebook_size
        self.group_dim = latent_dim // num_groups
        self.quantizers = nn.ModuleList(
            VectorQuantizer(self.group_dim, codebook_size, codebook_dim, dead_code_threshold, usage_decay)
            for _ in range(num_groups)
        )

    def forward(self, latent: torch.Tensor) -> QuantizerOutput:
        outputs = [q(group) for q, group in zip(self.quantizers, latent.split(self.group_dim, dim=1))]
        return _merge(outputs, torch.cat([o[0] for o in outputs], dim=1))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, groups, frames) -> latent (batch, latent_dim, frames)."""
        return torch.cat([q.decode(tokens[:, i]) for i, q in enumerate(self.quantizers)], dim=1)

    def decode_expected(self, probs: torch.Tensor) -> torch.Tensor:
        """Per-group token distributions (batch, groups, frames, codebook_size) -> expected latent (batch, latent_dim,
        frames). The groups are independent, so each group's expectation is taken alone."""
        return torch.cat([q.decode_expected(probs[:, i]) for i, q in enumerate(self.quantizers)], dim=1)

    def group_codes(self) -> torch.Tensor:
        """Every group's codes where its tokens are chosen: L2-normalised, as the cosine look-up sees them
        (groups, codebook_size, codebook_dim)."""
        return torch.stack([F.normalize(q.codebook.weight, dim=-1) for q in self.quantizers])


class ResidualVectorQuantizer(nn.Module):
    """Quantise the whole latent, then each residual in turn: stage k refines stages < k (serial)."""

    def __init__(self, latent_dim: int, num_groups: int, codebook_size: int, codebook_dim: int,
                 dead_code_threshold: float, usage_decay: float):
        super().__init__()
        self.num_groups, self.codebook_size = num_groups, codebook_size
        self.quantizers = nn.ModuleList(
            VectorQuantizer(latent_dim, codebook_size, codebook_dim, dead_code_threshold, usage_decay)
            for _ in range(num_groups)
        )

    def forward(self, latent: torch.Tensor) -> QuantizerOutput:
        residual, quantized, outputs = latent, torch.zeros_like(latent), []
        for quantizer in self.quantizers:
            outputs.append(quantizer(residual))
            quantized = quantized + outputs[-1][0]
            residual = residual - outputs[-1][0].detach()
        return _merge(outputs, quantized)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, stages, frames) -> latent (batch, latent_dim, frames)."""
        return sum(q.decode(tokens[:, k]) for k, q in enumerate(self.quantizers))

    def decode_expected(self, probs: torch.Tensor) -> torch.Tensor:
        raise UserError("decoding by expectation needs independent token groups (a group VQ); a residual VQ's "
                        "stages depend on each other's choices")

    @torch.no_grad()
    def code_vectors(self) -> torch.Tensor:
        """Every code's latent contribution per stage: (stages, codebook_size, latent_dim)."""
        codes = torch.arange(self.codebook_size, device=self.quantizers[0].codebook.weight.device)[None]
        return torch.stack([q.decode(codes)[0].t() for q in self.quantizers])


class SplitVectorQuantizer(nn.Module):
    """The latent's channels in `num_groups` groups, each quantised by Euclidean look-up in a fixed codebook.

    No projections and no gradients: `fit` sets the codebooks by k-means on data before training, and they never
    change, so the tokens are final from the start. The codebooks are buffers (groups, codebook_size, group_dim).
    """

    def __init__(self, latent_dim: int, num_groups: int, codebook_size: int):
        super().__init__()
        if latent_dim % num_groups:
            raise UserError(f"latent_dim {latent_dim} is not divisible by num_groups {num_groups}")
        self.num_groups, self.codebook_size = num_groups, codebook_size
        self.group_dim = latent_dim // num_groups
        self.register_buffer("codebooks", torch.zeros(num_groups, codebook_size, self.group_dim))

    @staticmethod
    def nearest(vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """vectors (..., dim), codes (codebook_size, dim) -> index of the nearest code by Euclidean distance (...)."""
        # argmin |v - c|^2 = argmax (2 v.c - |c|^2): |v|^2 is the same for every code.
        return argmax(2 * torch.matmul(vectors, codes.t()) - codes.pow(2).sum(dim=-1))

    def encode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (batch, latent_dim, frames) -> tokens (batch, groups, frames)."""
        groups = latent.split(self.group_dim, dim=1)
        return torch.stack([self.nearest(g.transpose(1, 2), codes) for g, codes in zip(groups, self.codebooks)], dim=1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, groups, frames) -> quantised latent (batch, latent_dim, frames)."""
        return torch.cat([F.embedding(tokens[:, g], codes).transpose(1, 2) for g, codes in enumerate(self.codebooks)],
                         dim=1)

    def decode_expected(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (batch, groups, frames, codebook_size) -> expected latent (batch, latent_dim, frames)."""
        # codes^T @ probs^T per group, one batched product: with the few latent channels of a group on the short
        # side this reads the distributions once, 4-6x faster on a CPU than probs @ codes group by group.
        codes = self.codebooks.transpose(1, 2).to(probs.dtype)  # (groups, group_dim, codebook_size)
        return torch.matmul(codes, probs.transpose(2, 3)).flatten(1, 2).to(self.codebooks.dtype)

    def group_codes(self) -> torch.Tensor:
        """Every group's codes where its tokens are chosen (groups, codebook_size, group_dim)."""
        return self.codebooks

    @torch.no_grad()
    def fit(self, latent: torch.Tensor, iterations: int, generator: torch.Generator) -> None:
        """Every group's codebook by k-means on its slice of latent (batch, latent_dim, frames).

        Empty clusters are reseeded on random members, so every code starts in use.
        """
        for g, group in enumerate(latent.split(self.group_dim, dim=1)):
            vectors = group.transpose(1, 2).reshape(-1, self.group_dim).float()

            def picks(count: int) -> torch.Tensor:
                return torch.randint(vectors.shape[0], (count,), generator=generator).to(vectors.device)

            centres = vectors[picks(self.codebook_size)]
            for _ in range(iterations):
                # In chunks: a (vectors x codes) matrix of hundreds of MB, allocated afresh in every iteration, costs
                # more in page faults than in arithmetic.
                members = torch.cat([self.nearest(chunk, centres) for chunk in vectors.split(4096)])
                counts = torch.bincount(members, minlength=self.codebook_size).float()
                sums = torch.zeros_like(centres).index_add_(0, members, vectors)
                empty = counts == 0
                centres = sums / counts.clamp(min=1.0)[:, None]
                centres[empty] = vectors[picks(int(empty.sum()))]
            self.codebooks[g] = centres.to(self.codebooks.dtype)
