"""The serial baseline (UDSE-style): RVQ tokens predicted one quantiser after another.

Generator k sees the degraded branch output plus the summed codebook vectors of the tokens of quantisers < k
(the clean tokens in training: teacher forcing; its own predictions at inference), so the K generators must run
one after another: the cost ParaGSE's independent groups avoid.

Shapes: degraded_wav (batch, samples) token-aligned; tokens (batch, quantizers, frames);
group_logits (batch, quantizers, frames, codebook_size).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.conformer import ConformerStack
from models.paragse import DegradedBranch, stft_features
from utils import load_state_dict_checked, validate_config


class SerialEnhancer(nn.Module):
    kind = "serial"

    def __init__(self, config: dict, codec):
        super().__init__()
        self.config = config
        s, conformer = config["serial"], config["enhancer"]["conformer"]
        dim = conformer["dim"]
        self.num_quantizers, self.codebook_size = codec.num_streams, codec.codebook_size
        # Frozen table of every code's latent vector per quantiser: (quantizers, codebook_size, latent_dim).
        with torch.no_grad():
            codes = torch.arange(codec.codebook_size)[None]
            table = torch.stack([codec.quantizer.stream_vectors(codes, k)[0].t() for k in range(codec.num_streams)])
        self.register_buffer("code_vectors", table.detach().clone(), persistent=False)
        self.branch = DegradedBranch(config, s["branch_conformer_blocks"], lstm_layers=0)
        self.previous = nn.ModuleList(nn.Linear(table.shape[-1], dim) for _ in range(self.num_quantizers))
        self.generators = nn.ModuleList(
            ConformerStack(1, s["generator_conformer_blocks"], conformer) for _ in range(self.num_quantizers)
        )
        self.logits = nn.ModuleList(nn.Linear(dim, codec.codebook_size) for _ in range(self.num_quantizers))

    def condition(self, degraded_wav: torch.Tensor) -> torch.Tensor:
        """The part that needs no tokens: degraded STFT -> branch output (batch, frames, dim).

        Split out, as in ParaGSE, so inference can compute it while the codec encodes the same audio.
        """
        return self.branch(stft_features(degraded_wav, self.config))

    def _run(self, degraded_wav: torch.Tensor, teacher_tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._generate(self.condition(degraded_wav), teacher_tokens)

    def _generate(self, branch: torch.Tensor, teacher_tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The K generators in sequence from the branch output -> (group_logits, tokens)."""
        summed = branch.new_zeros(*branch.shape[:2], self.code_vectors.shape[-1])
        all_logits, tokens = [], []
        for k in range(self.num_quantizers):
            x = branch + self.previous[k](summed)
            logits = self.logits[k](self.generators[k](x[None])[0])  # (batch, frames, codes)
            chosen = logits.argmax(-1) if teacher_tokens is None else teacher_tokens[:, k]
            summed = summed + self.code_vectors[k][chosen]
            all_logits.append(logits)
            tokens.append(chosen)
        return torch.stack(all_logits, dim=1), torch.stack(tokens, dim=1)

    def forward(self, degraded_wav: torch.Tensor, degraded_tokens: torch.Tensor,
                teacher_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """-> group_logits (batch, quantizers, frames, codes); teacher-forced when `teacher_tokens` is given.

        `degraded_tokens` is accepted for interface parity with ParaGSE; UDSE conditions on the spectrum only.
        """
        return self._run(degraded_wav, teacher_tokens)[0]

    def predict_tokens(self, degraded_wav: torch.Tensor, degraded_tokens: torch.Tensor) -> torch.Tensor:
        """Serial decoding with its own predictions -> (batch, quantizers, frames)."""
        return self._run(degraded_wav, None)[1]

    def tokens_from_condition(self, branch: torch.Tensor, degraded_tokens: torch.Tensor) -> torch.Tensor:
        """Serial decoding from the branch output (`condition`) -> (batch, quantizers, frames)."""
        return self._generate(branch, None)[1]

    def checkpoint_payload(self, codec_payload: dict) -> dict:
        return {"kind": self.kind, "config": self.config, "model": self.state_dict(), "codec": codec_payload}

    @classmethod
    def from_payload(cls, payload: dict, codec, source: str | Path) -> "SerialEnhancer":
        model = cls(validate_config(payload["config"]), codec)
        load_state_dict_checked(model, payload["model"], source)
        return model.eval()
