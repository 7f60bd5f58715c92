"""Waveform from a log-mel spectrogram: pseudo-inverse of the mel filterbank, then fast Griffin-Lim.

Shapes: log-mel (batch, n_mels, frames) -> wav (batch, samples), with frames = samples / hop + 1 (centred STFT).

Why a codec decoder may end here instead of in an inverse MDCT: the MDCT is critically sampled, so every sign pattern
of its coefficients is a valid signal and a decoder must learn the signs (the phase) from data; on a CPU budget it
does not (see MODEL_CARD.md). A centred STFT with hop 40 and window 320 is 8x redundant, so a phase consistent with
a magnitude can be found by iteration instead of learned.

Why the iteration does not start from zero phase: the phase of a smooth-window STFT is tied to the gradient of its
log-magnitude (Portnoff; Prusa et al., "A noniterative method for reconstruction of phase from STFT magnitude",
2017). Integrating the instantaneous frequency that the frequency-gradient gives, frame by frame, yields a phase
that is already nearly consistent; a few iterations then do what 32 from zero phase did (research/griffin_lim_options.py
measures the choice).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError


# The Gaussian whose phase-magnitude relation best matches a Hann window of length L has time spread
# lambda = 0.25645 L^2 samples^2 (Prusa et al., 2017, table 1).
HANN_GAUSSIAN_SPREAD = 0.25645


def integrated_phase(magnitude: torch.Tensor, n_fft: int, hop_length: int, win_length: int) -> torch.Tensor:
    """Phase angles in [0, 2 pi) (batch, frames, bins) for a frame-major STFT magnitude, from the instantaneous
    frequency its log-magnitude gradient along frequency implies, integrated over frames (trapezoid rule; frame 0 has
    phase 0).

    For a partial at frequency f (cycles per sample), a Gaussian window of spread lambda makes the log-magnitude
    across bins m a parabola with slope -2 pi lambda (m / n_fft - f) / n_fft, so f = m / n_fft + n_fft / (2 pi lambda)
    * d(log|S|)/dm, and the phase of bin m advances by 2 pi f hop per frame.
    """
    log_magnitude = magnitude.clamp(min=1e-6).log()
    slope = torch.zeros_like(log_magnitude)
    slope[..., 1:-1] = 0.5 * (log_magnitude[..., 2:] - log_magnitude[..., :-2])
    spread = HANN_GAUSSIAN_SPREAD * win_length ** 2
    bins = torch.arange(magnitude.shape[-1], device=magnitude.device, dtype=magnitude.dtype)
    advance = (2 * math.pi * hop_length / n_fft) * bins + (hop_length * n_fft / spread) * slope
    # The sum reaches about 2 pi x bins x hop / n_fft radians per frame (5e5 after 10 s), where float32 resolves
    # only hundredths of a radian: summed in float64 and wrapped.
    phase = advance.new_zeros(advance.shape, dtype=torch.float64)
    torch.cumsum(0.5 * (advance[:, 1:] + advance[:, :-1]), dim=1, dtype=torch.float64, out=phase[:, 1:])
    return phase.remainder_(2 * math.pi).to(magnitude.dtype)


def at_fft_bins(dense: torch.Tensor, n_fft: int) -> torch.Tensor:
    """Rows of a matrix over the bins of a longer FFT (dense_bins, ...) read at the n_fft // 2 + 1 bin frequencies of
    an FFT of n_fft, by linear interpolation (exact where the sizes divide)."""
    step = 2 * (dense.shape[0] - 1) / n_fft  # dense bins per bin of this FFT
    position = torch.arange(n_fft // 2 + 1, dtype=torch.float64, device=dense.device) * step
    below = position.floor().long().clamp(max=dense.shape[0] - 2)
    fraction = (position - below).to(dense.dtype).view(-1, *[1] * (dense.dim() - 1))
    return dense[below] * (1 - fraction) + dense[below + 1] * fraction


class FrameSTFT(nn.Module):
    """`utils.stft` and `utils.istft` laid out for iterating on a spectrogram: (batch, samples) <-> complex (batch,
    frames, n_fft // 2 + 1), each frame's DFT taken relative to the first sample of its window instead of the
    first sample of its zero-padded FFT buffer.

    Why a second layout of the one STFT: Griffin-Lim and the input blend transform back and forth many times, and
    there `torch.stft`/`torch.istft` spend as long as the FFTs themselves on transposing to bins-major, padding each
    frame to the FFT length, and recomputing the window envelope on every call. Here the frames stay frame-major
    (each FFT reads and writes one contiguous row), the overlap-add is the window's few hop-sized blocks added in
    place, and the envelope is computed once per length. Magnitudes equal `utils.stft`'s; phases differ by a fixed
    rotation per bin (`rotation`: exp(2 pi i k offset / n_fft) with the window's offset in the FFT buffer), which a
    magnitude-only iteration and a real gain per bin are both indifferent to, and `inverse` undoes exactly.
    Only for hops that divide the window (the overlap-add cuts the window into whole hops).
    """

    def __init__(self, n_fft: int, hop_length: int, win_length: int):
        super().__init__()
        if win_length % hop_length or win_length > n_fft:
            raise UserError(f"the hop ({hop_length}) must divide the window ({win_length}), which the FFT "
                            f"({n_fft}) must cover")
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        offset = (n_fft - win_length) // 2  # where torch.stft puts the window in the FFT buffer
        self.left = n_fft // 2 - offset  # samples of a centred first frame before the signal starts
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        bins = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
        self.register_buffer("rotation", torch.polar(torch.ones_like(bins), 2 * math.pi * offset / n_fft * bins)
                             .to(torch.complex64), persistent=False)
        self.envelopes: dict[tuple[int, torch.device], torch.Tensor] = {}

    def forward(self, wav: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, samples) -> (batch, samples // hop + 1, bins), or only the frames at the indices `frames`."""
        samples = wav.shape[-1]
        right = self.win_length - self.left
        # utils.stft's padding (a reflection needs more samples than half an FFT), of which only the part the
        # windows reach is built.
        mode = "reflect" if samples > self.n_fft // 2 else "constant"
        padded = F.pad(wav[:, None], (self.left, right), mode=mode)[:, 0]
        windows = padded.unfold(-1, self.win_length, self.hop_length)
        if frames is not None:
            windows = windows[:, frames]
        return torch.fft.rfft(windows * self.window, n=self.n_fft)

    def envelope(self, frames: int, device: torch.device) -> torch.Tensor:
        """1 / the overlap-added squared window of `frames` frames (cached: an iteration asks for few lengths)."""
        key = (frames, device)
        envelope = self.envelopes.get(key)  # one lookup: concurrent chunks may clear the cache meanwhile
        if envelope is None:
            squared = self.window.square().expand(1, frames, self.win_length)
            envelope = 1.0 / self.overlap_add(squared).clamp(min=1e-11)
            if len(self.envelopes) >= 8:
                self.envelopes.clear()
            self.envelopes[key] = envelope
        return envelope

    def overlap_add(self, frames: torch.Tensor) -> torch.Tensor:
        """(batch, frames, win) -> (batch, (frames - 1) * hop + win), the frames at hop intervals, summed."""
        batch, count, _ = frames.shape
        hop, per_frame = self.hop_length, self.win_length // self.hop_length
        blocks = frames.reshape(batch, count, per_frame, hop)
        out = frames.new_zeros(batch, count + per_frame - 1, hop)
        for k in range(per_frame):
            out[:, k:k + count] += blocks[:, :, k]
        return out.view(batch, -1)

    def inverse(self, spectrum: torch.Tensor, length: int) -> torch.Tensor:
        """(batch, frames, bins) -> (batch, length): utils.istft's least-squares inverse; zeros past the last
        frame's reach."""
        frames = torch.fft.irfft(spectrum, n=self.n_fft)[..., :self.win_length] * self.window
        wav = self.overlap_add(frames) * self.envelope(spectrum.shape[1], spectrum.device)
        wav = wav[:, self.left:self.left + length]
        return F.pad(wav, (0, length - wav.shape[-1])) if wav.shape[-1] < length else wav


class MelGriffinLim(nn.Module):
    """Fast Griffin-Lim (Perraudin et al., 2013) from the integrated phase; deterministic (no random start).

    Long inputs iterate in chunks of `chunk_frames` frames that overlap by `overlap_frames` and are cross-faded:
    Griffin-Lim is local (a frame is tied only to the frames its window overlaps), the chunks start from one
    integrated phase, and a chunk's spectrogram stays in the CPU's cache through the iteration where a 10-s one does
    not. `run_tasks` runs the chunks (in order here; cpu_speed runs them as concurrent single-threaded tasks).
    """

    def __init__(self, mel_filters: torch.Tensor, hop_length: int, win_length: int, n_fft: int, iterations: int,
                 momentum: float, chunk_frames: int, overlap_frames: int):
        """mel_filters (n_mels, mel_n_fft // 2 + 1): the filterbank that made the log-mel (`LogMel.filters`), so the
        two cannot drift apart."""
        super().__init__()
        if n_fft < win_length:
            raise UserError(f"griffin_lim.n_fft ({n_fft}) must cover the window ({win_length})")
        if iterations < 0:
            raise UserError(f"griffin_lim.iterations must be 0 or more, not {iterations}")
        if not 2 <= overlap_frames < chunk_frames / 2:
            raise UserError(f"griffin_lim.overlap_frames ({overlap_frames}) must be at least 2 and below half of "
                            f"chunk_frames ({chunk_frames})")
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        self.window_frames = -(-win_length // hop_length)  # the frames one window spans, rounded up
        self.iterations, self.momentum = iterations, momentum
        self.chunk_frames, self.overlap_frames = chunk_frames, overlap_frames
        self.run_tasks: Callable[[list[Callable[[], torch.Tensor]]], list[torch.Tensor]] = \
            lambda tasks: [task() for task in tasks]
        self.register_buffer("inverse_filters", self.inverse_filterbank(mel_filters, n_fft), persistent=False)
        self.frame_stft = FrameSTFT(n_fft, hop_length, win_length)

    @staticmethod
    def inverse_filterbank(mel_filters: torch.Tensor, n_fft: int) -> torch.Tensor:
        """(n_fft // 2 + 1, n_mels): the pseudo-inverse of the filterbank, read at this FFT's bin frequencies.

        The log-mel's STFT zero-pads a window shorter than its FFT, so its bins sample the window's spectrum more
        densely than the iteration's FFT does; both sample the same smooth spectrum, and linear interpolation
        between the dense bins (exact where the sizes divide) gives the magnitude the iteration aims at, whose FFT
        can then be as short as the window (the cost).
        """
        return at_fft_bins(torch.linalg.pinv(mel_filters.double()), n_fft).float()

    def magnitude(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> linear STFT magnitude, frame-major (batch, frames, n_fft // 2 + 1)."""
        return torch.matmul(log_mel.float().exp().transpose(1, 2), self.inverse_filters.T).clamp_(min=0.0)

    def initial_phase(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Unit phasors (batch, frames, bins) the iteration starts from, in `frame_stft`'s convention: the integrated
        phase, which starts at zero in utils.stft's."""
        angle = integrated_phase(magnitude, self.n_fft, self.hop_length, self.win_length)
        return torch.polar(torch.ones_like(angle), angle.add_(self.frame_stft.rotation.angle()))

    def iterate(self, magnitude: torch.Tensor, phase: torch.Tensor, length: int) -> torch.Tensor:
        """Frame-major magnitude and starting phasors (batch, frames, bins) in `frame_stft`'s convention -> wav
        (batch, length)."""
        previous = torch.zeros_like(phase)
        for _ in range(self.iterations):
            rebuilt = self.frame_stft(self.frame_stft.inverse(magnitude * phase, length))
            # lerp with weight 1 + momentum is rebuilt + momentum * (rebuilt - previous), in one pass; sgn is z / |z|
            phase = torch.lerp(previous, rebuilt, 1.0 + self.momentum).sgn_()
            previous = rebuilt
        return self.frame_stft.inverse(magnitude * phase, length)

    def stretches(self, frames: int, needed: torch.Tensor | None = None) -> list[tuple[int, int]]:
        """(first, end) frames to synthesise: the whole recording, or with `needed` (bool (frames,)) the stretches
        within `margin` frames of a needed frame.

        The margin is a window's reach (win / hop frames, rounded up, plus one), so that no needed frame's window
        reaches a stretch's edge, and half a window more: Griffin-Lim is local, so a needed frame that far inside
        its stretch comes out nearly as from the whole recording (on the valid split, as well as with four times
        the context: docs/experiments.md, item 29).
        """
        if needed is None:
            return [(0, frames)]
        margin = self.window_frames + 1 + -(-self.window_frames // 2)
        near = F.max_pool1d(needed.float()[None], 2 * margin + 1, 1, margin)[0] > 0
        edges = torch.diff(near.to(torch.int8), prepend=near.new_zeros(1, dtype=torch.int8),
                           append=near.new_zeros(1, dtype=torch.int8)).nonzero().flatten().tolist()
        return list(zip(edges[::2], edges[1::2]))

    def chunks(self, frames: int, parts: int = 1) -> list[tuple[int, int]]:
        """(first, end) frames of nearly equal chunks of at most about chunk_frames, overlapping by overlap_frames;
        at least `parts` where each is still four overlaps long."""
        step = self.chunk_frames - self.overlap_frames
        count = max(1, round((frames - self.overlap_frames) / step), min(parts, frames // (4 * self.overlap_frames)))
        bounds = [round(i * (frames - self.overlap_frames) / count) for i in range(count + 1)]
        return [(bounds[i], min(frames, bounds[i + 1] + self.overlap_frames)) for i in range(count)]

    def forward(self, log_mel: torch.Tensor, length: int | None = None,
                needed: torch.Tensor | None = None) -> torch.Tensor:
        """log_mel (batch, n_mels, frames) -> wav (batch, length or (frames - 1) * hop); longer is zero-padded.

        needed: None, or bool (frames,): the frames whose STFT the caller will use (the input blend's fill); only
        the stretches around them are iterated (`stretches`), the rest stays silent.
        """
        frames, hop = log_mel.shape[-1], self.hop_length
        wav = log_mel.new_zeros(log_mel.shape[0], (frames - 1) * hop, dtype=torch.float32)
        stretches = self.stretches(frames, needed)
        if not stretches:
            return self.fit_length(wav, length)
        # The stretches iterate as one sequence, each followed by a window's worth of silent frames (zero
        # magnitude). A frame then sees no sample of a neighbouring stretch, and the silent frames add nothing: each
        # stretch is iterated apart, but with the operations (and Python's dispatch, which two threads cannot share)
        # of one sequence instead of one per stretch. The whole recording is one stretch without a gap.
        pieces, offsets = [], []
        for first, end in stretches:
            offsets.append(sum(piece.shape[1] for piece in pieces))
            magnitude = self.magnitude(log_mel[..., first:end])
            pieces += [magnitude, magnitude.new_zeros(magnitude.shape[0], self.window_frames, magnitude.shape[2])]
        # The input blend's stretches make a short sequence: in two chunks it keeps two concurrent tasks busy, not
        # one (two whatever the thread count, so that the output does not depend on it). A whole recording keeps
        # its chunks: a short one cut in two lost copy-synthesis ESTOI (docs/experiments.md, item 29).
        packed = self.iterate_chunks(torch.cat(pieces[:-1], dim=1), parts=1 if needed is None else 2)
        for (first, end), offset in zip(stretches, offsets):
            wav[:, first * hop: (end - 1) * hop] = packed[:, offset * hop: (offset + end - first - 1) * hop]
        return self.fit_length(wav, length)

    def iterate_chunks(self, magnitude: torch.Tensor, parts: int = 1) -> torch.Tensor:
        """Frame-major magnitude (batch, frames, bins) -> wav (batch, (frames - 1) * hop): the iteration from the
        integrated phase, in cross-faded chunks (`chunks(frames, parts)`) that share it (so that the cross-fades add
        coherent signals)."""
        frames, hop = magnitude.shape[1], self.hop_length
        phase = self.initial_phase(magnitude)
        spans = self.chunks(frames, parts)
        pieces = self.run_tasks([lambda a=a, b=b: self.iterate(magnitude[:, a:b], phase[:, a:b], (b - a - 1) * hop)
                                 for a, b in spans])
        wav = magnitude.new_zeros(magnitude.shape[0], (frames - 1) * hop)
        fade = (self.overlap_frames - 1) * hop  # a chunk of n frames gives (n - 1) * hop samples
        ramp = torch.linspace(0, 1, fade + 2, device=magnitude.device)[1:-1]
        for (a, b), piece in zip(spans, pieces):
            weight = torch.ones(piece.shape[-1], device=magnitude.device)
            if a > 0:  # linear cross-fades that sum to one over each overlap
                weight[:fade] = ramp
            if b < frames:
                weight[-fade:] = ramp.flip(0)
            wav[:, a * hop: a * hop + piece.shape[-1]] += piece * weight
        return wav

    @staticmethod
    def fit_length(wav: torch.Tensor, length: int | None) -> torch.Tensor:
        """(batch, (frames - 1) * hop) -> (batch, length): zero-padded or cut; unchanged if length is None."""
        return wav if length is None else F.pad(wav, (0, max(0, length - wav.shape[-1])))[..., :length]
