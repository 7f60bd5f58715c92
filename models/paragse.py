"""ParaGSE: predicts the clean tokens of all N codec groups at once from the degraded STFT and degraded tokens.

Shapes at the boundary:
    degraded_wav     (batch, samples)         token-aligned length (Codec.pad)
    degraded_tokens  (batch, groups, frames)  from the frozen codec encoder
    group_logits     (batch, groups, frames, codebook_size)
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.conformer import ConformerStack, GroupedBiLSTM, GroupedLinear, concurrency, run_concurrently, split_groups
from utils import UserError, load_state_dict_checked, stft, validate_config


def stft_features(wav: torch.Tensor, config: dict) -> torch.Tensor:
    """Degraded STFT magnitude and phase stacked: (batch, samples) -> (batch, n_fft + 2, frames)."""
    s = config["enhancer"]["stft"]
    spec = stft(wav, s["n_fft"], s["hop_length"], s["win_length"])
    magnitude = torch.sqrt(spec.real**2 + spec.imag**2 + s["magnitude_eps"])
    phase = torch.atan2(spec.imag, spec.real)
    return torch.cat([magnitude, phase], dim=1)


class DegradedBranch(nn.Module):
    """STFT features (batch, n_fft + 2, 8F) -> (batch, F, dim): strided convs, residual BiLSTM, conformers."""

    def __init__(self, config: dict, conformer_blocks: int, lstm_layers: int):
        super().__init__()
        b, conformer = config["enhancer"]["branch"], config["enhancer"]["conformer"]
        channels, dim = b["conv_channels"], conformer["dim"]
        expected_in = config["enhancer"]["stft"]["n_fft"] + 2
        if channels[0] != expected_in:
            raise UserError(f"enhancer.branch.conv_channels[0] must be n_fft + 2 = {expected_in}, got {channels[0]}")
        if channels[-1] != dim or (lstm_layers and 2 * b["lstm_hidden"] != dim):
            raise UserError("enhancer.branch.conv_channels[-1] and 2 * lstm_hidden must equal enhancer.conformer.dim")
        self.convs = nn.ModuleList(
            nn.Conv1d(c_in, c_out, b["conv_kernel"], b["conv_stride"], padding=b["conv_kernel"] // 2)
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in channels[1:])
        self.slope = b["leaky_relu_slope"]
        self.lstm = GroupedBiLSTM(1, dim, b["lstm_hidden"], lstm_layers) if lstm_layers else None
        self.conformers = ConformerStack(1, conformer_blocks, conformer)
        self.project = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features
        for conv, norm in zip(self.convs, self.norms):
            x = F.leaky_relu(norm(conv(x).transpose(1, 2)).transpose(1, 2), self.slope)
        x = x.transpose(1, 2)[None]  # (1, batch, frames, dim): a single group
        if self.lstm is not None:
            x = x + self.lstm(x)
        return self.project(self.conformers(x)[0])


class TokenBranches(nn.Module):
    """All N token branches as one batched computation (weights stacked on a leading group axis)."""

    def __init__(self, config: dict, num_groups: int, codebook_size: int):
        super().__init__()
        t, conformer = config["enhancer"]["token_branch"], config["enhancer"]["conformer"]
        dim = conformer["dim"]
        if 2 * t["lstm_hidden"] != dim:
            raise UserError("2 * enhancer.token_branch.lstm_hidden must equal enhancer.conformer.dim")
        self.num_groups, self.codebook_size = num_groups, codebook_size
        # One table of num_groups * codebook_size rows: group g's code k is row g * codebook_size + k.
        self.embedding = nn.Embedding(num_groups * codebook_size, t["embedding_dim"])
        self.fuse = GroupedLinear(num_groups, t["embedding_dim"] + dim, dim)
        self.lstm = GroupedBiLSTM(num_groups, dim, t["lstm_hidden"], t["lstm_layers"])
        self.conformers = ConformerStack(num_groups, t["conformer_blocks"], conformer)
        self.logits = GroupedLinear(num_groups, dim, codebook_size)
        offsets = torch.arange(num_groups) * codebook_size
        self.register_buffer("offsets", offsets.view(num_groups, 1, 1), persistent=False)

    def forward(self, branch: torch.Tensor, degraded_tokens: torch.Tensor) -> torch.Tensor:
        """branch (batch, frames, dim), degraded_tokens (batch, groups, frames) -> (batch, groups, frames, codes).

        At inference with several threads the groups are cut into one part per thread and the parts run as
        concurrent single-threaded tasks (see models.conformer); the logits are bit-identical either way.
        """
        parts = split_groups(self.num_groups, 1 if self.training else concurrency())
        if len(parts) == 1:
            return self._forward_groups(branch, degraded_tokens, None)
        return torch.cat(run_concurrently([lambda part=part: self._forward_groups(branch, degraded_tokens, part)
                                           for part in parts]), dim=1)

    def _forward_groups(self, branch: torch.Tensor, degraded_tokens: torch.Tensor, part: slice | None) -> torch.Tensor:
        """The branches of the groups in `part` (all when None) -> (batch, len(part), frames, codes)."""
        offsets = self.offsets if part is None else self.offsets[part]
        tokens = degraded_tokens if part is None else degraded_tokens[:, part]
        embedded = self.embedding(tokens.transpose(0, 1) + offsets)  # (G, B, F, emb)
        shared = branch[None].expand(embedded.shape[0], -1, -1, -1)
        x = self.fuse(torch.cat([embedded, shared], dim=-1), part)
        x = x + self.lstm(x, part)
        return self.logits(self.conformers(x, part), part).transpose(0, 1)


class ParaGSE(nn.Module):
    kind = "paragse"

    def __init__(self, config: dict, num_groups: int, codebook_size: int):
        super().__init__()
        self.config = config
        b, t = config["enhancer"]["branch"], config["enhancer"]["token_branch"]
        self.branch = DegradedBranch(config, b["conformer_blocks"], b["lstm_layers"])
        self.token_branches = TokenBranches(config, num_groups, codebook_size)

    def forward(self, degraded_wav: torch.Tensor, degraded_tokens: torch.Tensor) -> torch.Tensor:
        """-> group_logits (batch, groups, frames, codebook_size)."""
        return self.logits_from_condition(self.condition(degraded_wav), degraded_tokens)

    def condition(self, degraded_wav: torch.Tensor) -> torch.Tensor:
        """The part that needs no tokens: degraded STFT -> branch output (batch, frames, dim).

        Split out so inference can compute it while the codec encodes the same audio (inference.Enhancer).
        """
        return self.branch(stft_features(degraded_wav, self.config))

    def logits_from_condition(self, branch: torch.Tensor, degraded_tokens: torch.Tensor) -> torch.Tensor:
        """branch output (batch, frames, dim) and degraded tokens -> group_logits (batch, groups, frames, codes)."""
        frames = degraded_tokens.shape[-1]
        if branch.shape[1] != frames:
            raise UserError(f"STFT branch gives {branch.shape[1]} frames but there are {frames} token frames; "
                             "pad the waveform with Codec.pad first")
        return self.token_branches(branch, degraded_tokens)

    def tokens_from_condition(self, branch: torch.Tensor, degraded_tokens: torch.Tensor) -> torch.Tensor:
        """One non-iterative pass from the branch output: arg-max of every group's logits -> (batch, groups, frames)."""
        return self.logits_from_condition(branch, degraded_tokens).argmax(dim=-1)

    def predict_tokens(self, degraded_wav: torch.Tensor, degraded_tokens: torch.Tensor) -> torch.Tensor:
        """One non-iterative pass: arg-max of every group's logits -> (batch, groups, frames)."""
        return self.tokens_from_condition(self.condition(degraded_wav), degraded_tokens)

    def checkpoint_payload(self, codec_payload: dict) -> dict:
        return {"kind": self.kind, "config": self.config, "model": self.state_dict(), "codec": codec_payload}

    @classmethod
    def from_payload(cls, payload: dict, codec, source: str | Path) -> "ParaGSE":
        model = cls(validate_config(payload["config"]), codec.num_streams, codec.codebook_size)
        load_state_dict_checked(model, payload["model"], source)
        return model.eval()
