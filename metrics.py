"""Speech-quality metrics: PESQ, STOI, ESTOI, SI-SDR, log-spectral distance and DNSMOS, and parallel scoring.

score_pair scores one enhanced (or degraded) signal against its clean reference; score_jobs scores many file
pairs (Job) in worker processes that each load DNSMOS once. Folder pairing, the per-file CSV, the per-condition
table, the figures and the command line are in evaluate.py.

Opt-in metrics for generative enhancement, each with its model inside its wheel: speaker similarity (`spk_sim`,
cosine of resemblyzer speaker embeddings of the output and the clean reference: is it still the same voice?),
ViSQOL v3 in speech mode (`visqol`, MOS-LQO, the codec community's intrusive quality score) and word error rate
(`wer`, pocketsphinx's English recogniser on the output against the transcript of the clean file: is it still
the same words? Only for files with a transcript).

Importable: score_pair, score_jobs, score_job, Job, MetricError, si_sdr, log_spectral_distance,
power_spectrogram, dnsmos_scores, speaker_similarity, visqol_score, word_error_rate, normalise_words, METRICS,
OPTIONAL_METRICS.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import re
import sys
import traceback
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pesq as pesq_lib
import soxr
from pystoi import stoi as pystoi_stoi
from speechmos import dnsmos as speechmos_dnsmos
from tqdm import tqdm

from utils import AudioError, UserError, load_audio

SAMPLE_RATE = 16000  # PESQ wide-band and DNSMOS are both defined at 16 kHz only.
LENGTH_TOLERANCE = 0.01  # relative length difference above which trimming is reported
PESQ_MIN_SECONDS = 0.25  # the P.862 implementation refuses shorter buffers

# Log-spectral distance / spectrogram settings (see log_spectral_distance for the definition).
LSD_N_FFT = 512
LSD_HOP = 256
POWER_FLOOR = 1e-8  # |X|^2 floor: keeps digital silence finite; ~-90 dB below a full-scale Hann frame
SI_SDR_CAP = 1e-12  # noise energy floor relative to target energy: caps SI-SDR at 120 dB for identical signals

# Column name -> (table header, decimals). The order here is the column order of the CSV and the table.
METRICS: dict[str, tuple[str, int]] = {
    "pesq": ("PESQ", 2),
    "stoi": ("STOI", 3),
    "estoi": ("ESTOI", 3),
    "si_sdr": ("SI-SDR", 2),
    "lsd": ("LSD", 2),
    "dnsmos_sig": ("SIG", 2),
    "dnsmos_bak": ("BAK", 2),
    "dnsmos_ovrl": ("OVRL", 2),
    "spk_sim": ("SpkSim", 3),
    "visqol": ("ViSQOL", 2),
    "wer": ("WER", 3),
}
# Opt-in (evaluate.py --metrics): what a generative enhancer can get wrong while sounding clean.
OPTIONAL_METRICS = ("spk_sim", "visqol", "wer")
# Raised whenever a metric's definition changes, so that scores stored by an earlier revision are not reused beside
# new ones (scripts/compare_peers.py). 2: every file's transcript from a fresh recogniser front end.
METRICS_REVISION = 2
DEGRADED_PREFIX = "degraded_"


class MetricError(ValueError):
    """A pair that cannot be scored (silent reference, too short, ...); the message is the reason."""


# ------------------------------------------------------------------------------------------------- metrics
def si_sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al., 2019).

    Both signals are made zero-mean; the target is the projection of the estimate on the reference,
    alpha * reference with alpha = <estimate, reference> / ||reference||^2, and
    SI-SDR = 10 log10(||target||^2 / ||estimate - target||^2). The noise energy is floored at 1e-12 of the
    target energy so that identical signals give a finite 120 dB instead of infinity.
    """
    est = np.asarray(estimate, dtype=np.float64) - np.mean(estimate)
    ref = np.asarray(reference, dtype=np.float64) - np.mean(reference)
    ref_energy = float(np.dot(ref, ref))
    if ref_energy == 0.0:
        raise MetricError("SI-SDR is undefined for a constant reference")
    target = (np.dot(est, ref) / ref_energy) * ref
    target_energy = float(np.dot(target, target))
    noise = est - target
    noise_energy = float(np.dot(noise, noise))
    if target_energy == 0.0:
        return -math.inf  # estimate orthogonal to the reference (e.g. all zeros): none of it is present
    return 10.0 * math.log10(target_energy / (noise_energy + SI_SDR_CAP * target_energy))


def power_spectrogram(audio: np.ndarray, n_fft: int = LSD_N_FFT, hop: int = LSD_HOP) -> np.ndarray:
    """|STFT|^2 with a periodic Hann window, frames of n_fft every hop samples, no centring: (frames, bins).

    A signal shorter than one frame is zero-padded to one frame; trailing samples that do not fill a frame
    are zero-padded into a last frame so the whole signal is covered.
    """
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    frames = 1 + max(0, math.ceil((len(x) - n_fft) / hop))
    x = np.pad(x, (0, (frames - 1) * hop + n_fft - len(x)))
    index = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    return np.abs(np.fft.rfft(x[index] * window, axis=1)) ** 2


def log_spectral_distance(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Log-spectral distance in dB (lower is better, 0 for identical signals).

    With P_r and P_e the power spectrograms of reference and estimate (STFT of 512 samples = 32 ms at
    16 kHz, hop 256, periodic Hann window, no centring, all 257 bins from 0 Hz to Nyquist) and a floor
    eps = 1e-8 added to every power value:

        LSD = mean over frames t of sqrt( mean over bins f of (10 log10((P_r[t,f] + eps) / (P_e[t,f] + eps)))^2 )

    i.e. the mean over frames of the RMS over frequency of the dB difference. The floor makes bins that are
    silent in both signals count as equal rather than undefined. Signals must have the same length.
    """
    if len(estimate) != len(reference):
        raise ValueError(f"lengths differ: {len(estimate)} vs {len(reference)}")
    ref_db = 10.0 * np.log10(power_spectrogram(reference) + POWER_FLOOR)
    est_db = 10.0 * np.log10(power_spectrogram(estimate) + POWER_FLOOR)
    return float(np.mean(np.sqrt(np.mean((ref_db - est_db) ** 2, axis=1))))


def _pesq_wb(clean: np.ndarray, estimate: np.ndarray) -> float:
    """Wide-band PESQ (ITU-T P.862.2) at 16 kHz, with the library's errors turned into one-line reasons."""
    try:
        return float(pesq_lib.pesq(SAMPLE_RATE, clean, estimate, "wb"))
    except pesq_lib.NoUtterancesError:
        raise MetricError("PESQ found no speech in the reference (no utterances detected)") from None
    except pesq_lib.BufferTooShortError:
        raise MetricError(f"too short for PESQ (needs at least {PESQ_MIN_SECONDS} s)") from None
    except pesq_lib.PesqError as e:
        raise MetricError(f"PESQ failed ({_decode(e)})") from None


def _decode(error: Exception) -> str:
    """The pesq C extension puts bytes in its exception arguments; show them as text."""
    arg = error.args[0] if error.args else type(error).__name__
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)


def _stoi(clean: np.ndarray, estimate: np.ndarray, extended: bool) -> float:
    """pystoi's STOI/ESTOI. pystoi only warns and returns 1e-5 when fewer than 30 non-silent frames remain;
    that number would silently drag the means down, so it becomes a failure with a reason instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(pystoi_stoi(clean, estimate, SAMPLE_RATE, extended=extended))
    if any("Not enough STFT frames" in str(w.message) for w in caught):
        raise MetricError("too little non-silent speech for STOI (needs 30 frames, about 0.4 s)")
    return value


# -------------------------------------------------------------------------------------------------- DNSMOS
_DNSMOS_MODEL: speechmos_dnsmos.DNSMOS | None = None
_DNSMOS_THREADS = 0  # onnxruntime intra-op threads for the model of this process; 0 = library default


def dnsmos_model_paths() -> tuple[Path, Path]:
    """The DNSMOS P.835 (SIG/BAK/OVRL) and P.808 ONNX models bundled inside the speechmos wheel."""
    folder = Path(speechmos_dnsmos.__file__).resolve().parent / "dnsmos_models"
    primary, p808 = folder / "sig_bak_ovr.onnx", folder / "model_v8.onnx"
    for path in (primary, p808):
        if not path.is_file():
            raise UserError(f"DNSMOS model missing from the speechmos package: {path} (reinstall speechmos)")
    return primary, p808


class _LocalDNSMOS(speechmos_dnsmos.DNSMOS):
    """speechmos's DNSMOS scorer, built from the bundled model files with a chosen thread count.

    speechmos.dnsmos.run() keeps one model per process too, but lets onnxruntime use every core; with one
    worker process per core that oversubscribes the CPU, so each worker's sessions get their share instead.
    Scoring (__call__: 9.01 s windows, 1 s hop, polynomial calibration) is speechmos's own.
    """

    def __init__(self, primary: Path, p808: Path, threads: int = 0) -> None:
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self.primary_model_path = str(primary)
        self.onnx_sess = ort.InferenceSession(str(primary), sess_options=options, providers=providers)
        self.p808_onnx_sess = ort.InferenceSession(str(p808), sess_options=options, providers=providers)


def dnsmos_model() -> speechmos_dnsmos.DNSMOS:
    """This process's DNSMOS model, loaded on first use and then reused for every file."""
    global _DNSMOS_MODEL
    if _DNSMOS_MODEL is None:
        _DNSMOS_MODEL = _LocalDNSMOS(*dnsmos_model_paths(), threads=_DNSMOS_THREADS)
    return _DNSMOS_MODEL


def dnsmos_scores(audio: np.ndarray) -> dict[str, float]:
    """DNSMOS P.835 SIG, BAK and OVRL (1..5, non-intrusive) of a 16 kHz signal."""
    # speechmos refuses samples outside [-1, 1] (possible in float wav files); clipping is what playback does.
    clipped = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    result = dnsmos_model()(clipped, SAMPLE_RATE, False)
    return {
        "dnsmos_sig": float(result["sig_mos"]),
        "dnsmos_bak": float(result["bak_mos"]),
        "dnsmos_ovrl": float(result["ovrl_mos"]),
    }


# ---------------------------------------------------------------------- who and what is said (opt-in)
_MODELS: dict[str, object] = {}  # this process's speaker encoder, ViSQOL and recogniser, each loaded on first use


def _model(name: str) -> object:
    if name not in _MODELS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # resemblyzer's webrtcvad warns about pkg_resources on import
            if name == "spk_sim":
                from resemblyzer import VoiceEncoder
                _MODELS[name] = VoiceEncoder("cpu", verbose=False)
            elif name == "visqol":
                from visqol import VisqolApi
                api = VisqolApi()
                # The polynomial MOS mapping of ViSQOL's speech mode; the lattice mapper would need a TFLite runtime.
                api.create(mode="speech", use_lattice_model=False)
                _MODELS[name] = api
            else:
                from pocketsphinx import Decoder
                _MODELS[name] = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")
    return _MODELS[name]


def speaker_similarity(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Cosine similarity (up to 1) of the speaker embeddings of two 16 kHz signals."""
    encoder = _model("spk_sim")  # first: it imports resemblyzer with its import-time warning silenced
    from resemblyzer import preprocess_wav

    embeddings = []
    for audio in (estimate, reference):
        speech = preprocess_wav(np.asarray(audio, dtype=np.float32), source_sr=SAMPLE_RATE)  # pauses trimmed
        if speech.size < SAMPLE_RATE // 4:
            raise MetricError("too little speech for a speaker embedding (under 0.25 s after trimming pauses)")
        embeddings.append(encoder.embed_utterance(speech))
    return float(np.dot(*embeddings))  # the embeddings have unit length


def visqol_score(estimate: np.ndarray, reference: np.ndarray) -> float:
    """ViSQOL v3 speech-mode MOS-LQO (1..5) of a 16 kHz signal against its reference."""
    result = _model("visqol").measure_from_arrays(np.asarray(reference, dtype=np.float64),
                                                  np.asarray(estimate, dtype=np.float64), SAMPLE_RATE)
    return float(result.moslqo)


_SPOKEN = {"*": " star ", "#": " pound ", "&": " and ", "%": " percent "} | {
    str(d): f" {w} " for d, w in enumerate("zero one two three four five six seven eight nine".split())}


def normalise_words(text: str) -> str:
    """Lower-case words without punctuation, symbols and single digits spelt out, bracketed notes dropped."""
    text = re.sub(r"\[[^\]]*\]", " ", text.lower())
    text = "".join(_SPOKEN.get(c, c) for c in text)
    return " ".join(re.sub(r"[^a-z' ]+", " ", text).split())


def recognise(audio: np.ndarray) -> str:
    decoder = _model("wer")
    pcm = (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767).astype(np.int16)
    # The recogniser's front end (its noise-removal filter) carries its state from one utterance to the next, so a
    # file's transcript depended on which files the same worker had recognised before it: WERs moved from run to
    # run. A fresh front end for every file (30 us) makes each transcript the file's own.
    decoder.reinit_feat()
    decoder.start_utt()
    decoder.process_raw(pcm.tobytes(), full_utt=True)
    decoder.end_utt()
    hypothesis = decoder.hyp()
    return normalise_words(hypothesis.hypstr if hypothesis is not None else "")


def word_error_rate(estimate: np.ndarray, transcript: str) -> float:
    """Word error rate of pocketsphinx's transcription of a 16 kHz signal against `transcript` (0 is perfect)."""
    import jiwer

    reference = normalise_words(transcript)
    if not reference:
        raise MetricError("the transcript has no words")
    return float(jiwer.wer(reference, recognise(estimate) or "<silence>"))


# ---------------------------------------------------------------------------------------------- one pair
def _mono_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected a mono 1-D signal, got shape {x.shape}")
    if sample_rate != SAMPLE_RATE:
        x = soxr.resample(x, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(x)


def _trim_to_shorter(estimate: np.ndarray, clean: np.ndarray, notes: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Cut both signals to the shorter length; a difference above 1% is worth telling the user about,
    because it usually means the enhancer dropped or added audio rather than rounding frames."""
    n_est, n_ref = len(estimate), len(clean)
    if n_est != n_ref:
        difference = abs(n_est - n_ref) / max(n_est, n_ref)
        if difference > LENGTH_TOLERANCE and notes is not None:
            notes.append(
                f"lengths differ by {100 * difference:.1f}% ({n_est} vs clean {n_ref} samples); "
                "both trimmed to the shorter"
            )
        n = min(n_est, n_ref)
        estimate, clean = estimate[:n], clean[:n]
    return estimate, clean


def score_pair(
    enhanced: np.ndarray,
    clean: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    dnsmos: bool = True,
    notes: list[str] | None = None,
    extra: Sequence[str] = (),
    transcript: str | None = None,
) -> dict[str, float]:
    """All metrics of one enhanced (or degraded) signal against its clean reference.

    Signals are mono float arrays at `sample_rate` (resampled to 16 kHz if needed) and are trimmed to the
    shorter of the two (a note is appended to `notes` when they differ by more than 1%). Returns
    {"pesq", "stoi", "estoi", "si_sdr", "lsd"} plus {"dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"} when
    `dnsmos`, plus the OPTIONAL_METRICS named in `extra` ("wer" only with a `transcript`). Raises MetricError
    with a one-line reason for a pair that cannot be scored.
    """
    estimate, reference = _trim_to_shorter(_mono_16k(enhanced, sample_rate), _mono_16k(clean, sample_rate), notes)
    seconds = len(reference) / SAMPLE_RATE
    if seconds < PESQ_MIN_SECONDS:
        raise MetricError(f"too short for PESQ ({seconds:.3f} s; needs at least {PESQ_MIN_SECONDS} s)")
    if not np.any(reference):
        raise MetricError("silent reference (all zeros): PESQ, STOI and SI-SDR are undefined")
    if not np.any(estimate):
        # pesq divides by the joint peak and then fails on NaN; say what is actually wrong.
        raise MetricError("silent signal (all zeros): PESQ is undefined")
    scores = {
        "pesq": _pesq_wb(reference, estimate),
        "stoi": _stoi(reference, estimate, extended=False),
        "estoi": _stoi(reference, estimate, extended=True),
        "si_sdr": si_sdr(estimate, reference),
        "lsd": log_spectral_distance(estimate, reference),
    }
    if dnsmos:
        scores.update(dnsmos_scores(estimate))
    unknown = set(extra) - set(OPTIONAL_METRICS)
    if unknown:
        raise UserError(f"unknown metric {sorted(unknown)[0]!r} (optional metrics: {', '.join(OPTIONAL_METRICS)})")
    if "spk_sim" in extra:
        scores["spk_sim"] = speaker_similarity(estimate, reference)
    if "visqol" in extra:
        scores["visqol"] = visqol_score(estimate, reference)
    if "wer" in extra and transcript is not None:
        scores["wer"] = word_error_rate(estimate, transcript)
    bad = [name for name, value in scores.items() if not math.isfinite(value)]
    if bad:
        raise MetricError(f"{', '.join(bad)} not finite")
    return scores


# -------------------------------------------------------------------------------------------- file pairs
@dataclass(frozen=True)
class Job:
    """One enhanced file and what it is compared with; `error` is set when pairing already failed."""

    file: str  # path relative to the enhanced folder, posix style, as written to the CSV
    condition: str
    enhanced: Path
    clean: Path | None
    degraded: Path | None
    want_degraded: bool
    error: str = ""
    transcript: str | None = None  # what the clean file says (for "wer")


# ------------------------------------------------------------------------------------------- scoring jobs
def _load(path: Path, role: str) -> tuple[np.ndarray, list[str]]:
    try:
        audio, notes = load_audio(path, SAMPLE_RATE)
    except AudioError as e:
        # The row already names the enhanced file; a clean/degraded counterpart may have another name.
        where = "" if role == "enhanced" else f" {path}"
        raise MetricError(f"{role} file{where}: {e}") from None
    return audio, [f"{role}: {note}" for note in notes]


def score_job(job: Job, dnsmos: bool = True, debug: bool = False, extra: Sequence[str] = ()) -> dict:
    """CSV row of one job: file, condition, metrics (degraded ones prefixed), notes, error.

    Never raises for a bad file: the reason goes into row["error"] so one file cannot stop a long run.
    """
    row: dict = {"file": job.file, "condition": job.condition}
    notes: list[str] = []
    try:
        if job.error:
            raise MetricError(job.error)
        assert job.clean is not None
        enhanced, more = _load(job.enhanced, "enhanced")
        notes += more
        clean, more = _load(job.clean, "clean")
        notes += more
        row.update(score_pair(enhanced, clean, dnsmos=dnsmos, notes=notes, extra=extra, transcript=job.transcript))
        if job.want_degraded:
            assert job.degraded is not None
            degraded, more = _load(job.degraded, "degraded")
            notes += more
            degraded_notes: list[str] = []
            try:
                scores = score_pair(degraded, clean, dnsmos=dnsmos, notes=degraded_notes, extra=extra,
                                    transcript=job.transcript)
            except MetricError as e:
                raise MetricError(f"degraded input: {e}") from None
            notes += [f"degraded input: {note}" for note in degraded_notes]
            row.update({DEGRADED_PREFIX + name: value for name, value in scores.items()})
        error = ""
    except MetricError as e:
        error = str(e)
    except Exception as e:  # a bug or library failure on one file must not lose the other results
        error = f"internal error ({type(e).__name__}: {e})"
        if debug:
            notes.append(traceback.format_exc())
    if error:
        row = {"file": job.file, "condition": job.condition}
    row["notes"] = "; ".join(notes)
    row["error"] = error
    return row


def _init_worker(dnsmos: bool, threads: int, extra: Sequence[str] = ()) -> None:
    """Worker start-up: set the ONNX / torch thread share and load DNSMOS (and the opt-in models) once, before
    the first file."""
    global _DNSMOS_THREADS
    _DNSMOS_THREADS = threads
    import torch  # the speaker encoder runs in torch: one worker per core, one thread each
    torch.set_num_threads(threads)
    if dnsmos:
        dnsmos_model()
    for name in extra:
        _model(name)


def score_jobs(
    jobs: Sequence[Job], workers: int | None = None, dnsmos: bool = True, progress: bool = True, debug: bool = False,
    extra: Sequence[str] = (),
) -> list[dict]:
    """Run score_job over `jobs` in worker processes with a progress bar; rows in the order of `jobs`."""
    if dnsmos:
        dnsmos_model_paths()  # fail once, here, rather than in every worker
    cpus = os.cpu_count() or 1
    workers = max(1, min(workers or cpus, len(jobs)))
    bar = tqdm(total=len(jobs), unit="file", desc="scoring", disable=not progress, file=sys.stderr)
    rows: dict[str, dict] = {}
    try:
        if workers == 1:
            for job in jobs:
                rows[job.file] = score_job(job, dnsmos, debug, extra)
                bar.update()
        else:
            threads = max(1, cpus // workers)
            init = (dnsmos, threads, tuple(extra))
            # Workers come from a fork server, not from a fork of this process: a process that has run OpenMP
            # code (torch, numba) cannot safely fork (GNU OpenMP aborts the child).
            context = multiprocessing.get_context("forkserver")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=init) as pool:
                futures = {pool.submit(score_job, job, dnsmos, debug, tuple(extra)): job for job in jobs}
                try:
                    for future in as_completed(futures):
                        rows[futures[future].file] = future.result()
                        bar.update()
                except KeyboardInterrupt:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        bar.close()
    return [rows[job.file] for job in jobs]
