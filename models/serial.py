"""The serial baseline (UDSE-style): residual-VQ tokens predicted one stage after another.

Generator k sees the degraded branch's output plus the summed codebook vectors of the tokens of stages < k (the
clean tokens in training: teacher forcing; its own predictions at inference), so the K generators must run one
after another: the cost ParaGSE's independent groups avoid.

Shapes: degraded_wav (batch, samples) token-aligned; condition (batch, frames, dim); tokens (batch, stages,
frames); group_logits (batch, stages, frames, codebook_size).
"""
from __future__ import annotations

import torch
from torch import nn

from models.conformer import ConformerStack
from models.paragse import DegradedBranch, STFTFeatures
from utils import argmax


class SerialEnhancer(nn.Module):
    def __init__(self, code_vectors: torch.Tensor, stft: dict, branch: dict, generator_conformer_blocks: int,
                 conformer: dict):
        """code_vectors (stages, codebook_size, latent_dim): the frozen codec's `code_vectors()`; the sections as
        ParaGSE's (the branch has no BiLSTM in UDSE: lstm_layers 0)."""
        super().__init__()
        dim = conformer["dim"]
        self.num_groups, codebook_size, latent_dim = code_vectors.shape
        self.register_buffer("code_vectors", code_vectors.detach().clone(), persistent=False)
        self.features = STFTFeatures(**stft)
        self.branch = DegradedBranch(stft["n_fft"] + 2, conformer=conformer, **branch)
        self.previous = nn.ModuleList(nn.Linear(latent_dim, dim) for _ in range(self.num_groups))
        self.generators = nn.ModuleList(ConformerStack(1, generator_conformer_blocks, **conformer)
                                        for _ in range(self.num_groups))
        self.logits = nn.ModuleList(nn.Linear(dim, codebook_size) for _ in range(self.num_groups))

    def forward(self, degraded_wav: torch.Tensor, degraded_tokens: torch.Tensor,
                teacher_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """-> group_logits, teacher-forced on `teacher_tokens` when given. `degraded_tokens` is taken for parity
        with ParaGSE: UDSE conditions on the spectrum only."""
        return self._generate(self.condition(degraded_wav), teacher_tokens)

    def condition(self, degraded_wav: torch.Tensor) -> torch.Tensor:
        return self.branch(self.features(degraded_wav))

    def predict(self, condition: torch.Tensor, degraded_tokens: torch.Tensor) -> torch.Tensor:
        """Serial decoding, each stage on its own arg-max choices before it -> group_logits."""
        return self._generate(condition, None)

    def _generate(self, condition: torch.Tensor, teacher_tokens: torch.Tensor | None) -> torch.Tensor:
        summed = condition.new_zeros(*condition.shape[:2], self.code_vectors.shape[-1])
        all_logits = []
        for k in range(self.num_groups):
            x = condition + self.previous[k](summed)
            logits = self.logits[k](self.generators[k](x[None])[0])  # (batch, frames, codes)
            chosen = argmax(logits) if teacher_tokens is None else teacher_tokens[:, k]
            summed = summed + self.code_vectors[k][chosen]
            all_logits.append(logits)
        return torch.stack(all_logits, dim=1)
