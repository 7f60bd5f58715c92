"""ParaGSE: predicts the clean tokens of all N codec groups at once from the degraded STFT and degraded tokens.

Shapes at the boundary:
    degraded_wav     (batch, samples)         token-aligned length (Codec.pad)
    condition        (batch, frames, dim)     the degraded-spectrum branch's output, one row per token frame
    degraded_tokens  (batch, groups, frames)  from the frozen codec encoder
    group_logits     (batch, groups, frames, codebook_size)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.conformer import ConformerStack, GroupedBiLSTM, GroupedLinear
from utils import UserError, stft


ATAN2_BLOCK = 16384  # elements: below torch's parallel grain size (32,768), and a multiple of every SIMD width


def phase_angle(imag: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """atan2(imag, real) of contiguous tensors, computed the same way whatever the thread count.

    Why not one torch.atan2 call: on CPU, atan2 of the strided real/imag views of a complex tensor takes the scalar
    path, about 10x slower (110 ms against 11 ms for 10 s of audio); on contiguous tensors it is vectorised, but a
    multi-threaded call splits the tensor at points that depend on the thread count, and the elements left over at
    each split take the scalar path, whose last bit can differ. Fixed blocks below the parallel grain are each one
    vectorised call on one thread, so the features do not depend on how many threads run them (nor, since the
    blocks start afresh in every batch item, on what else is in the batch).

    imag, real (batch, ...) contiguous.
    """
    out = torch.empty_like(real)
    if real.device.type != "cpu":
        return torch.atan2(imag, real, out=out)
    for item in range(real.shape[0]):  # item by item: the blocks of each start at its first element
        flat_imag, flat_real, angle = imag[item].reshape(-1), real[item].reshape(-1), out[item].view(-1)
        for start in range(0, flat_real.numel(), ATAN2_BLOCK):
            block = slice(start, start + ATAN2_BLOCK)
            torch.atan2(flat_imag[block], flat_real[block], out=angle[block])
    return out


class STFTFeatures(nn.Module):
    """Degraded STFT magnitude and phase stacked: (batch, samples) -> (batch, n_fft + 2, frames).

    The result is a transposed view of frame-major memory (each frame's magnitudes, then its phases, contiguous), the
    order the FFT writes its output in: no transposing copy of the spectrum, and DegradedBranch's convolutions read
    it channels-last.
    """

    def __init__(self, n_fft: int, hop_length: int, win_length: int, magnitude_eps: float):
        super().__init__()
        self.n_fft, self.hop_length, self.win_length, self.magnitude_eps = n_fft, hop_length, win_length, magnitude_eps

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        spec = stft(wav, self.n_fft, self.hop_length, self.win_length).transpose(1, 2)  # (batch, frames, bins)
        # Real and imaginary parts de-interleaved in one pass: atan2 is vectorised only on contiguous tensors.
        real, imag = torch.view_as_real(spec).permute(3, 0, 1, 2).contiguous()
        bins = real.shape[-1]
        features = real.new_empty(real.shape[0], real.shape[1], 2 * bins)
        # The same operations in the same order as sqrt(real**2 + imag**2 + eps), so the same values (not addcmul_,
        # whose fused multiply-add rounds differently).
        magnitude = torch.mul(real, real, out=features[..., :bins])
        magnitude.add_(imag * imag).add_(self.magnitude_eps).sqrt_()
        features[..., bins:] = phase_angle(imag, real)
        return features.transpose(1, 2)


class DegradedBranch(nn.Module):
    """STFT features (batch, channels, 8F) -> (batch, F, dim): strided convs, residual BiLSTM, conformers, Linear."""

    def __init__(self, in_channels: int, conv_channels: list[int], conv_kernel: int, conv_stride: int,
                 leaky_relu_slope: float, lstm_hidden: int, lstm_layers: int, conformer_blocks: int, conformer: dict):
        super().__init__()
        dim = conformer["dim"]
        if conv_channels[0] != in_channels:
            raise UserError(f"enhancer.branch.conv_channels[0] must be n_fft + 2 = {in_channels}, "
                            f"not {conv_channels[0]}")
        if conv_channels[-1] != dim or (lstm_layers and 2 * lstm_hidden != dim):
            raise UserError("enhancer.branch.conv_channels[-1] and 2 * lstm_hidden must equal enhancer.conformer.dim")
        self.convs = nn.ModuleList(nn.Conv1d(c_in, c_out, conv_kernel, conv_stride, padding=conv_kernel // 2)
                                   for c_in, c_out in zip(conv_channels[:-1], conv_channels[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in conv_channels[1:])
        self.slope = leaky_relu_slope
        self.lstm = GroupedBiLSTM(1, dim, lstm_hidden, lstm_layers) if lstm_layers else None
        self.conformers = ConformerStack(1, conformer_blocks, **conformer)
        self.project = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.context(self.local(features))

    def local(self, features: torch.Tensor) -> torch.Tensor:
        """Convolutions and BiLSTM -> (1, batch, F, dim). Split from `context` because the two run best apart on
        a CPU: the recurrence is a chain of small steps that gains nothing from a second thread, while the
        conformers' large products do."""
        x = features
        for conv, norm in zip(self.convs, self.norms):
            # A 2-D convolution of a (batch, channels, 1, frames) view: on frame-major input (STFTFeatures') oneDNN
            # runs it channels-last and returns frame-major rows, which the LayerNorm over channels reads as they are:
            # no transposed copies between the layers (about a tenth of the paper configuration's front on a CPU).
            y = F.conv2d(x.unsqueeze(2), conv.weight.unsqueeze(2), conv.bias, stride=(1, conv.stride[0]),
                         padding=(0, conv.padding[0]))
            x = F.leaky_relu(norm(y.squeeze(2).transpose(1, 2)), self.slope).transpose(1, 2)
        x = x.transpose(1, 2)[None]  # (1, batch, frames, dim): a single group
        if self.lstm is not None:
            x = x + self.lstm(x)
        return x

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """Conformers (attention over every frame) and the projection: (1, batch, F, dim) -> (batch, F, dim)."""
        return self.project(self.conformers(x)[0])


class DegradedCodePrior(nn.Module):
    """Logits that favour the codes nearest each frame's degraded code, as strongly as a predicted gate says.

    Why: much of a degraded recording is intact, but the token branches can copy an intact code only through what
    the embedding table learnt for that code, one code of 1,024 at a time; on held-out speakers the trained demo
    model predicted the clean token less often than copying the degraded one would have (valid accuracy 0.134
    against 0.136). This term offers the copy for every code at once: minus each code's squared distance to the
    frame's degraded code (in the space the codec chose its tokens in, in units of the median squared distance
    between two codes of the group) times a gate per group and frame, exp(Linear(hidden)), so that the branch can
    copy where the input is intact and ignore it where it is not. The gate is exponential because copying needs it
    hundreds of times stronger than a gentle pull does (a code's nearest neighbour sits about 1/60 of that median
    away, squared). It starts at strength exp(initial_log_strength) everywhere (weights zero), and the Linear's
    output is multiplied by log_strength_scale: AdamW moves a weight by about the learning rate per step, so at
    1e-3 an unscaled log-strength would need thousands of steps to move far. A gate that starts nearly shut stays
    shut on training data, where the branches already copy well (measured: 500 steps from exp(-4) moved it by
    0.04); it has to start open and learn where to close (docs/experiments.md, item 24).

    Shapes: hidden (groups, batch, frames, dim); group_codes (groups, codebook_size, code_dim).
    """

    GATE_RANGE = (-30.0, 15.0)  # log-gate limits: far beyond any useful strength, short of float overflow

    def __init__(self, group_codes: torch.Tensor, dim: int, initial_log_strength: float, log_strength_scale: float):
        super().__init__()
        codes = group_codes.detach().float().clone()
        groups, codebook_size, _ = codes.shape
        spread = torch.stack([torch.cdist(group, group).pow(2).median().clamp(min=1e-12) for group in codes])
        # -|x - c|^2 = 2 x.c - |c|^2 - |x|^2: [x, 1, |x|^2] times this (code_dim + 2, codebook_size) matrix, so the
        # whole term is one small matrix product added onto the logits in the same pass.
        distance_terms = torch.cat([2 * codes, -codes.pow(2).sum(dim=-1, keepdim=True),
                                    -codes.new_ones(groups, codebook_size, 1)], dim=-1).transpose(1, 2)
        self.register_buffer("distance_terms", distance_terms / spread.view(groups, 1, 1), persistent=False)
        self.register_buffer("codes", codes.flatten(0, 1), persistent=False)  # group g's code k: row g * size + k
        self.log_strength_scale = log_strength_scale
        self.gate = GroupedLinear(groups, dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, initial_log_strength / log_strength_scale)

    def forward(self, hidden: torch.Tensor, degraded_rows: torch.Tensor, group_logits: torch.Tensor) -> torch.Tensor:
        """degraded_rows (groups, batch, frames): the degraded tokens as rows of all groups' codes (g * size + k),
        as TokenBranches indexes its embedding table; group_logits (groups, batch, frames, codebook_size) -> the
        same with this term added."""
        degraded = F.embedding(degraded_rows, self.codes)  # (G, B, F, code_dim)
        # In float32 even under autocast: at a strong gate the term is large, and the differences between nearby
        # codes, which are what it is for, would be lost at bfloat16's 8-bit precision.
        with torch.autocast(hidden.device.type, enabled=False):
            strength = (self.log_strength_scale * self.gate(hidden.float())).clamp(*self.GATE_RANGE).exp()
            features = torch.cat([degraded, torch.ones_like(degraded[..., :1]),
                                  degraded.pow(2).sum(dim=-1, keepdim=True)], dim=-1) * strength
            return torch.baddbmm(group_logits.float().flatten(1, 2), features.flatten(1, 2),
                                 self.distance_terms).view(group_logits.shape)


class TokenBranches(nn.Module):
    """All N token branches as one batched computation (weights stacked on a leading group axis)."""

    def __init__(self, num_groups: int, codebook_size: int, embedding_dim: int, lstm_hidden: int, lstm_layers: int,
                 conformer_blocks: int, conformer: dict, copy_prior: dict | None = None,
                 group_codes: torch.Tensor | None = None):
        """copy_prior: None, or DegradedCodePrior's arguments but group_codes and dim, which then needs
        group_codes (groups, codebook_size, code_dim): the codec quantizer's `group_codes()`."""
        super().__init__()
        self.arguments = dict(num_groups=num_groups, codebook_size=codebook_size, embedding_dim=embedding_dim,
                              lstm_hidden=lstm_hidden, lstm_layers=lstm_layers, conformer_blocks=conformer_blocks,
                              conformer=conformer, copy_prior=copy_prior, group_codes=group_codes)
        dim = conformer["dim"]
        if 2 * lstm_hidden != dim:
            raise UserError("2 * enhancer.token_branch.lstm_hidden must equal enhancer.conformer.dim")
        self.num_groups, self.codebook_size = num_groups, codebook_size
        # One table of num_groups * codebook_size rows: group g's code k is row g * codebook_size + k.
        self.embedding = nn.Embedding(num_groups * codebook_size, embedding_dim)
        self.fuse = GroupedLinear(num_groups, embedding_dim + dim, dim)
        self.lstm = GroupedBiLSTM(num_groups, dim, lstm_hidden, lstm_layers)
        self.conformers = ConformerStack(num_groups, conformer_blocks, **conformer)
        self.logits = GroupedLinear(num_groups, dim, codebook_size)
        self.copy_prior = None
        if copy_prior is not None:
            if group_codes is None or tuple(group_codes.shape[:2]) != (num_groups, codebook_size):
                raise UserError("enhancer.token_branch.copy_prior needs the codec's code vectors of every group")
            self.copy_prior = DegradedCodePrior(group_codes, dim, **copy_prior)
        offsets = torch.arange(num_groups) * codebook_size
        self.register_buffer("offsets", offsets.view(num_groups, 1, 1), persistent=False)

    def forward(self, condition: torch.Tensor, degraded_tokens: torch.Tensor) -> torch.Tensor:
        """condition (batch, frames, dim), degraded_tokens (batch, groups, frames) -> group_logits."""
        degraded_rows = degraded_tokens.transpose(0, 1) + self.offsets  # (G, B, F): rows of the per-group tables
        embedded = self.embedding(degraded_rows)  # (G, B, F, emb)
        shared = condition[None].expand(embedded.shape[0], -1, -1, -1)
        x = self.fuse(torch.cat([embedded, shared], dim=-1))
        x = self.conformers(x + self.lstm(x))
        group_logits = self.logits(x)
        if self.copy_prior is not None:
            group_logits = self.copy_prior(x, degraded_rows, group_logits)
        return group_logits.transpose(0, 1)

    def select(self, groups: slice) -> "TokenBranches":
        """The branches of `groups` alone, sharing this module's weights (for running groups apart at inference).

        Every weight and buffer is group-major along its first axis, so a group's rows are a contiguous slice.
        """
        count = len(range(self.num_groups)[groups])
        codes = self.arguments["group_codes"]
        subset = TokenBranches(**self.arguments | {"num_groups": count,
                                                   "group_codes": None if codes is None else codes[groups]})
        state = {}
        for name, value in self.state_dict().items():
            rows = value.shape[0] // self.num_groups if value.dim() else 0
            state[name] = value[groups.start * rows: groups.stop * rows] if rows else value
        subset.load_state_dict(state, assign=True)
        return subset.train(self.training)


class ParaGSE(nn.Module):
    """Degraded STFT -> DegradedBranch -> condition; condition + each group's degraded tokens -> its logits."""

    def __init__(self, num_groups: int, codebook_size: int, stft: dict, branch: dict, token_branch: dict,
                 conformer: dict, group_codes: torch.Tensor | None = None):
        """stft: STFTFeatures' arguments; branch: DegradedBranch's but in_channels and conformer; token_branch:
        TokenBranches' but num_groups, codebook_size, conformer and group_codes; conformer: ConformerStack's but
        groups and num_blocks (shared by both branches); group_codes: the codec's, for token_branch.copy_prior."""
        super().__init__()
        self.features = STFTFeatures(**stft)
        self.branch = DegradedBranch(stft["n_fft"] + 2, conformer=conformer, **branch)
        self.token_branches = TokenBranches(num_groups, codebook_size, conformer=conformer, group_codes=group_codes,
                                            **token_branch)

    def forward(self, degraded_wav: torch.Tensor, degraded_tokens: torch.Tensor) -> torch.Tensor:
        """-> group_logits (batch, groups, frames, codebook_size)."""
        return self.predict(self.condition(degraded_wav), degraded_tokens)

    def condition(self, degraded_wav: torch.Tensor) -> torch.Tensor:
        """The part that needs no tokens (inference computes it while the codec encodes the same audio)."""
        return self.branch(self.features(degraded_wav))

    def predict(self, condition: torch.Tensor, degraded_tokens: torch.Tensor) -> torch.Tensor:
        """One non-iterative pass for every group -> group_logits (batch, groups, frames, codebook_size)."""
        if condition.shape[1] != degraded_tokens.shape[-1]:
            raise UserError(f"the STFT branch gives {condition.shape[1]} frames but there are "
                            f"{degraded_tokens.shape[-1]} token frames; pad the waveform with Codec.pad first")
        return self.token_branches(condition, degraded_tokens)
