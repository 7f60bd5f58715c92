"""Keep the degraded recording where the predicted clean log-mel says it is intact; the generated speech elsewhere.

Shapes: degraded wav (batch, samples), predicted log-mel (batch, n_mels, frames) with frames = samples / hop + 1,
intact (batch, groups, token frames), generated wav (batch, length <= samples) -> wav (batch, length).

Why: a codec re-synthesises every part of a recording, the intact parts too, and its 80-band log-mel carries no
harmonic fine structure or phase, which Griffin-Lim has to invent. Where a degraded recording is mostly speech (high
SNR, the band below a band-limit, much of a clipped recording) the input itself is closer to the clean speech than
any re-synthesis. So, per mel band and frame, with P the predicted clean band magnitude and D the degraded one
(both averaged over `smoothing_frames`, so the gains do not flutter from frame to frame):
    the degraded STFT is scaled by g + (1 - g) * q with g = min(1, P / D): where the input is louder than the
        prediction (noise, reverberant tails) it is brought down to it, keeping its own fine structure and phase,
        and left alone where it is not; q is the square of the probability the model gives the input's own token
        of that band's group (`intact`), so that where the model itself calls the input intact, a prediction below
        it is taken for the model's error and the input kept;
    the generated STFT fills what is missing, scaled by sqrt(1 - min(1, fill_tolerance * D / P)^2): nothing where
        the input is within `fill_tolerance` of the prediction, all of it where the input is silent (a band-limit),
        so that in a band the input lacks the two add up to P in energy. The tolerance keeps the codec's speech out
        of bands the input has (the prediction is never exact there: adding speech of another phase to intact input
        cost ESTOI), so it fills only what is missing.
The predicted magnitude decides both, so an input the model thinks intact comes through unchanged (exactly: the
STFT is inverted with its own phase), and a band it thinks missing comes from the codec alone.
A band-limited input (a telephone line, a low sample rate, a codec's low-pass: every mel band from some band up
stands more than `band_limit_depth_db` below the input's strongest band, over the whole segment, and that first empty
band lies at or below `band_limit_max_hz`) keeps every band below the limit as it is, and the generated speech fills
the bands above it: the low-band replacement of bandwidth-extension systems. Without it the model's error in the
intact bands (the prediction a little below the input) cost band-limited speech ESTOI (test split: 0.994 in, 0.850
out). The limit is judged from the input alone, and a recording can have been noisy before it was band-limited (a
natively narrow-band source in noise), so the input below the limit is kept whole only as far as it looks clean: by
its dynamic range (the 95th against the 10th percentile of its frames' power below the limit), not at all up to the
first value of `band_limit_clean_db`, fully from the second, in proportion between; a noisy one is blended as above
(chosen in docs/experiments.md, item 34). A full-band input has no empty top band and is blended as above.
Measured in docs/experiments.md, items 26 and 28: it raises PESQ and ESTOI of noisy, band-limited and clipped
input, and lowers DNSMOS OVRL (what is kept of the input keeps some of its noise, reverberation and distortion): a
choice for intelligibility and fidelity over naturalness, which `inference.py --no_blend` reverses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.griffin_lim import FrameSTFT, at_fft_bins
from models.log_mel import LogMel
from utils import UserError


def settings_problem(smoothing_frames: object, fill_tolerance: object, band_limit_depth_db: object = None,
                     band_limit_max_hz: object = None, band_limit_clean_db: object = None) -> str | None:
    """What is wrong with the blend's settings, in a few words, or None: smoothing_frames an integer of 1 or more,
    fill_tolerance a number of 1 or more, and the band-limit rule's depth and frequency positive numbers and its
    clean range [low, high] with 0 <= low < high, all three or none. The one check behind InputBlend and a
    checkpoint's inference.blend (checkpoint.check_blend), so that both refuse the same settings."""
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN

    if not (isinstance(smoothing_frames, int) and not isinstance(smoothing_frames, bool) and smoothing_frames >= 1):
        return f"smoothing_frames must be an integer of 1 or more, not {smoothing_frames!r}"
    if not (number(fill_tolerance) and fill_tolerance >= 1):
        return f"fill_tolerance must be 1 or more, not {fill_tolerance!r}"
    rule = (band_limit_depth_db, band_limit_max_hz, band_limit_clean_db)
    if all(x is None for x in rule):
        return None
    clean = band_limit_clean_db
    if not (all(number(x) and x > 0 for x in rule[:2]) and isinstance(clean, (list, tuple)) and len(clean) == 2
            and all(number(x) for x in clean) and 0 <= clean[0] < clean[1]):
        return ("band_limit_depth_db and band_limit_max_hz must be positive and band_limit_clean_db [low, high] with "
                f"0 <= low < high, all three given or none, not {band_limit_depth_db!r}, {band_limit_max_hz!r} and "
                f"{band_limit_clean_db!r}")
    return None


class InputBlend(nn.Module):
    """The degraded STFT under band gains from the predicted log-mel, plus the generated STFT for what it lacks."""

    def __init__(self, log_mel: LogMel, frame_stft: FrameSTFT, bands_per_group: int, smoothing_frames: int,
                 fill_tolerance: float, band_limit_depth_db: float | None = None,
                 band_limit_max_hz: float | None = None, band_limit_clean_db: tuple[float, float] | None = None):
        """log_mel: the codec's (`MelCodec.log_mel`), whose analysis of the degraded input is compared with the
        prediction; frame_stft: the STFT the two signals are mixed in (the codec's Griffin-Lim's, whose frames are
        the log-mel's: shared, with its cache of window envelopes); bands_per_group: the adjacent mel bands each token
        group quantises (the codec's split VQ); smoothing_frames and fill_tolerance (at least 1); the band-limit
        rule's band_limit_depth_db and band_limit_max_hz (positive) and band_limit_clean_db (low, high), all three
        or none (no band-limit rule, as in checkpoints exported before it): see the module's docstring."""
        super().__init__()
        problem = settings_problem(smoothing_frames, fill_tolerance, band_limit_depth_db, band_limit_max_hz,
                                   band_limit_clean_db)
        if problem:
            raise UserError(f"inference.blend: {problem}")
        self.bands_per_group = bands_per_group
        self.log_mel = log_mel
        self.frame_stft = frame_stft
        self.smoothing_frames, self.fill_tolerance = smoothing_frames, fill_tolerance
        self.band_limit_depth_db, self.band_limit_clean_db = band_limit_depth_db, band_limit_clean_db
        self.register_buffer("bin_weights", self.band_weights(log_mel.filters, frame_stft.n_fft), persistent=False)
        # The first empty band of a band-limit counts only up to band_limit_max_hz: the number of bands at or below it
        # (by their peak frequency). Above it the top band of a full-band recording can be empty too (a resampler's
        # roll-off near the Nyquist frequency), and its noise would be kept.
        peaks_hz = log_mel.filters.argmax(dim=1).double() * (log_mel.sample_rate / log_mel.n_fft)
        self.band_limit_max_band = int((peaks_hz <= band_limit_max_hz).sum()) if band_limit_max_hz else 0

    @staticmethod
    def band_weights(mel_filters: torch.Tensor, n_fft: int) -> torch.Tensor:
        """(n_mels, n_fft // 2 + 1): how much each band's gain counts at each bin of the mixing STFT (columns sum to
        one). The filters are read at this FFT's bin frequencies; a bin that no filter reaches (DC) takes the band
        whose peak is nearest."""
        weights = at_fft_bins(mel_filters.double().T, n_fft).T
        peaks = mel_filters.argmax(dim=1).double() * (n_fft / (2 * (mel_filters.shape[1] - 1)))  # in this FFT's bins
        for empty in (weights.sum(dim=0) <= 0).nonzero().flatten().tolist():
            weights[(peaks - empty).abs().argmin(), empty] = 1.0
        return (weights / weights.sum(dim=0, keepdim=True)).float()

    def smooth(self, x: torch.Tensor) -> torch.Tensor:
        """Moving average over `smoothing_frames` frames, centred, same length."""
        k = self.smoothing_frames
        if k == 1:
            return x
        return F.avg_pool1d(x, k, 1, k // 2, count_include_pad=False)[..., :x.shape[-1]]

    def gains(self, degraded_bands: torch.Tensor, predicted_bands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Band magnitudes D and P (batch, n_mels, frames) -> the degraded input's and the generated speech's gains."""
        ratio = predicted_bands / degraded_bands
        keep = ratio.clamp(max=1.0)
        fill = (1.0 - (self.fill_tolerance / ratio).clamp(max=1.0).square()).sqrt()
        return keep, fill

    def analyse(self, degraded_wav: torch.Tensor, log_mel: torch.Tensor | None = None) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
        """What the blend needs of the degraded input alone: its band magnitudes D as the codec's log-mel measures
        them, smoothed (batch, n_mels, frames), so that P and D are on one scale, and its frame-major spectrum
        (batch, frames, bins). log_mel: the codec's log-mel of degraded_wav, if its encoder has just computed it."""
        degraded_wav = degraded_wav.float()
        log_mel = self.log_mel(degraded_wav) if log_mel is None else log_mel
        return self.smooth(log_mel.exp()), self.frame_stft(degraded_wav)

    def band_gains(self, predicted_log_mel: torch.Tensor, analysis: tuple[torch.Tensor, torch.Tensor],
                   intact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The predicted log-mel (batch, n_mels, frames), `analyse`'s result and `intact` (batch, groups,
        token frames: the predicted probability that each degraded token is the clean one) -> the degraded input's
        and the generated speech's band gains (batch, n_mels, frames).

        The input's gain min(1, P / D) is raised towards 1 in proportion to `intact` squared: where the model gives
        the input's own code most of its probability it says the input is intact there, and a prediction below the
        input is the model's (and the codec decoder's) error, not degradation. Squared, so that a split decision
        (0.5) counts for a quarter: chosen on the valid split against the plain and the fourth power
        (docs/experiments.md, item 28).
        """
        degraded_bands = analysis[0]
        predicted_bands = self.smooth(predicted_log_mel.float().exp())
        if degraded_bands.shape != predicted_bands.shape:
            raise UserError(f"the predicted log-mel has {predicted_bands.shape[-1]} frames but the degraded input "
                            f"{degraded_bands.shape[-1]}; pass the token-aligned (padded) input")
        keep, fill = self.gains(degraded_bands, predicted_bands)
        # Each group's probability on its bands, from token frames to log-mel frames (linear, as the codec decoder
        # interpolates its frame means), then smoothed like the gains.
        trust = F.interpolate(intact.float().square().repeat_interleave(self.bands_per_group, dim=1),
                              size=keep.shape[-1], mode="linear", align_corners=False)
        trust = self.smooth(trust)
        keep = keep + (1.0 - keep) * trust
        if self.band_limit_depth_db is not None:
            below = torch.arange(keep.shape[1], device=keep.device) < self.bands_below_limit(degraded_bands)[:, None]
            if below.any():  # most inputs are full-band: nothing to keep, no dynamic range to measure
                clean = self.cleanness(degraded_bands, below)[:, None, None] * below[..., None]  # (batch, n_mels, 1)
                keep = keep + (1.0 - keep) * clean
                fill = fill * (1.0 - clean)
        return keep, fill

    def bands_below_limit(self, degraded_bands: torch.Tensor) -> torch.Tensor:
        """Band magnitudes D (batch, n_mels, frames) -> (batch,) how many mel bands lie below a band-limit of each
        item's input: those up to its highest band within band_limit_depth_db of its strongest (long-term power),
        0 where the band above them is not empty or lies above band_limit_max_hz."""
        power = degraded_bands.square().mean(dim=-1)  # D >= the log-mel's floor: never 0
        present = power >= power.amax(dim=1, keepdim=True) * 10 ** (-self.band_limit_depth_db / 10)
        bands = present.shape[1] - present.flip(1).int().argmax(dim=1)  # up to the highest present band
        return torch.where(bands < self.band_limit_max_band, bands, 0)

    def cleanness(self, degraded_bands: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
        """Band magnitudes D (batch, n_mels, frames) and the bands below each item's limit (batch, n_mels), bool ->
        (batch,) from 0 to 1, how clean the input below its limit looks by its dynamic range (see the module's
        docstring); 0 for an item without a limit."""
        frame_power = (degraded_bands.square() * below[..., None]).sum(dim=1).clamp(min=1e-30)  # (batch, frames)
        low, high = torch.quantile(10 * frame_power.log10(), torch.tensor([0.10, 0.95], device=below.device), dim=1)
        start, full = self.band_limit_clean_db
        return ((high - low - start) / (full - start)).clamp(0.0, 1.0) * below.any(dim=1)

    @staticmethod
    def needed_frames(fill: torch.Tensor) -> torch.Tensor:
        """bool (frames,): where any band of any item takes some generated speech. Elsewhere the generated waveform
        is multiplied by zero, so the vocoder need not make it (MelGriffinLim's `needed`): on noisy or reverberant
        input that is most of a recording."""
        return (fill > 0).flatten(0, 1).any(dim=0)

    def mix(self, analysis: tuple[torch.Tensor, torch.Tensor], keep: torch.Tensor, fill: torch.Tensor,
            generated_wav: torch.Tensor, samples: int, needed: torch.Tensor | None = None) -> torch.Tensor:
        """The degraded spectrum under `keep` plus the generated speech's under `fill` -> wav (batch, length of
        generated_wav); samples: the degraded input's length; needed: `needed_frames(fill)`, if already computed."""
        length = generated_wav.shape[-1]
        # Frame-major spectra (batch, frames, bins); both share FrameSTFT's phase convention and the gains are real,
        # so the mix is the one utils.stft's spectra would give. The generated speech only where it is filled in.
        mixed = analysis[1] * torch.matmul(keep.transpose(1, 2), self.bin_weights)
        filled = (self.needed_frames(fill) if needed is None else needed).nonzero().flatten()
        if filled.numel():
            generated = self.frame_stft(F.pad(generated_wav.float(), (0, samples - length)), filled)
            mixed[:, filled] += generated * torch.matmul(fill[..., filled].transpose(1, 2), self.bin_weights)
        return self.frame_stft.inverse(mixed, samples)[..., :length]

    def forward(self, degraded_wav: torch.Tensor, predicted_log_mel: torch.Tensor, intact: torch.Tensor,
                generated_wav: torch.Tensor, analysis: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """intact: see `band_gains`; analysis: `analyse(degraded_wav)`, if already computed. (inference.Enhancer
        calls the steps itself, to let the vocoder skip what the fill does not use.)"""
        analysis = self.analyse(degraded_wav) if analysis is None else analysis
        keep, fill = self.band_gains(predicted_log_mel, analysis, intact)
        return self.mix(analysis, keep, fill, generated_wav, degraded_wav.shape[-1])


def token_probability(probabilities: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The probability each token gets: probabilities (batch, groups, frames, codebook_size), tokens (batch, groups,
    frames) -> (batch, groups, frames). With the degraded tokens, the blend's `intact`."""
    return probabilities.gather(-1, tokens[..., None])[..., 0]


def input_blend_for(codec: nn.Module, smoothing_frames: int, fill_tolerance: float,
                    band_limit_depth_db: float | None = None, band_limit_max_hz: float | None = None,
                    band_limit_clean_db: tuple[float, float] | None = None) -> InputBlend:
    """The blend for a codec whose decoder predicts its own log-mel and synthesises it by Griffin-Lim (MelCodec)."""
    log_mel, griffin_lim = getattr(codec, "log_mel", None), getattr(codec, "griffin_lim", None)
    if log_mel is None or griffin_lim is None:
        raise UserError(f"inference.blend needs a codec that decodes to a log-mel (MelCodec), not "
                        f"{type(codec).__name__}; set it to null")
    return InputBlend(log_mel, griffin_lim.frame_stft, codec.quantizer.group_dim, smoothing_frames, fill_tolerance,
                      band_limit_depth_db, band_limit_max_hz, band_limit_clean_db)
