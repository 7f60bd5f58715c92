"""Score enhanced speech against clean references: PESQ, STOI, ESTOI, SI-SDR, LSD and DNSMOS.

    python evaluate.py --enhanced_dir E --clean_dir C [--degraded_dir D] [--manifest M.csv]
                       [--output results.csv] [--workers N] [--figures N] [--figures_dir figures/]
                       [--no_dnsmos] [--metrics spk_sim,visqol,wer --transcripts T.csv] [--debug]

Files are paired by relative path (E/x/y.wav with C/x/y.wav). When E (and D) hold one sub-folder per
condition but C is flat, E/<condition>/<name>.wav is paired with C/<name>.wav. A counterpart with another
audio extension (E/a.wav with C/a.flac) is accepted. The condition of a file comes from --manifest
(CSV with columns file,condition; `file` relative to E or to C), else from its first folder, else "all".

--metrics adds the opt-in metrics of generative enhancement (metrics.py): speaker similarity `spk_sim`, ViSQOL
`visqol` and word error rate `wer`, the last for the clean files that --transcripts (CSV with columns file,text;
`file` relative to C) gives a transcript for.

Writes one CSV row per file (failed files included, with their reason in the `error` column), prints a
markdown table of means per condition and names every file that could not be scored. Exit code 0 when
every file was scored, 1 when some were not, 2 for a user error (missing folder, no pairs).

Importable: evaluate_dirs, build_jobs, read_manifest, summarise / condition_means / markdown_table, write_csv,
plot_spectrograms. The metrics themselves (score_pair, si_sdr, log_spectral_distance, DNSMOS) and the
parallel scoring of file pairs (score_jobs) are in metrics.py.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from metrics import (DEGRADED_PREFIX, LENGTH_TOLERANCE, METRICS, OPTIONAL_METRICS, POWER_FLOOR, SAMPLE_RATE, Job,
                     power_spectrogram, score_jobs)
from utils import (AUDIO_EXTENSIONS, UserError, atomic_write, find_audio_files, load_audio, require_writable,
                   run_command)


# ----------------------------------------------------------------------------------------- pairing files
def _counterpart(root: Path, rel: Path) -> Path | None:
    """root/rel, or the same path with another audio extension (enhancers often write wav for flac input)."""
    exact = root / rel
    if exact.is_file():
        return exact
    for extension in AUDIO_EXTENSIONS:
        candidate = (root / rel).with_suffix(extension)
        if candidate.is_file():
            return candidate
    return None


def _counterpart_or_flat(root: Path, rel: Path) -> Path | None:
    """Same relative path, else (for E/<condition>/<rel> layouts) the path without its first folder."""
    found = _counterpart(root, rel)
    if found is None and len(rel.parts) > 1:
        found = _counterpart(root, Path(*rel.parts[1:]))
    return found


def manifest_key(path: str | Path) -> str:
    """Manifest and transcript lookup key: posix relative path without extension, so a.wav matches a.flac."""
    return Path(path).with_suffix("").as_posix()


def read_transcripts(path: str | Path) -> dict[str, str]:
    """{clean path relative to the clean folder, without extension: what it says} from a CSV (columns file, text)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"transcripts not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"file", "text"} <= set(reader.fieldnames or []):
            columns = ", ".join(reader.fieldnames or [])
            raise UserError(f"transcripts {path} need columns 'file' and 'text' (has {columns})")
        return {manifest_key(r["file"].strip()): r["text"].strip() for r in reader
                if (r.get("file") or "").strip()}


def parse_metrics(text: str | None) -> tuple[str, ...]:
    """--metrics 'spk_sim,wer' -> ('spk_sim', 'wer'); an unknown name is a UserError listing the known ones."""
    names = tuple(n.strip() for n in (text or "").split(",") if n.strip())
    unknown = [n for n in names if n not in OPTIONAL_METRICS]
    if unknown:
        raise UserError(f"--metrics: unknown metric {unknown[0]!r} (choose from {', '.join(OPTIONAL_METRICS)})")
    return names


def read_manifest(path: str | Path) -> dict[str, str]:
    """{relative path without extension: condition} from a CSV with at least columns file and condition."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    conditions: dict[str, str] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "file" not in columns or "condition" not in columns:
            raise UserError(f"manifest {path} needs columns 'file' and 'condition' (has {', '.join(columns)})")
        for line, record in enumerate(reader, start=2):
            name, condition = (record.get("file") or "").strip(), (record.get("condition") or "").strip()
            if not name or not condition:
                raise UserError(f"manifest {path} line {line}: empty file or condition")
            key = manifest_key(name)
            if conditions.get(key, condition) != condition:
                raise UserError(f"manifest {path} gives {name} two conditions ({conditions[key]}, {condition})")
            conditions[key] = condition
    return conditions


def build_jobs(
    enhanced_dir: str | Path,
    clean_dir: str | Path,
    degraded_dir: str | Path | None = None,
    manifest: Mapping[str, str] | None = None,
    transcripts: Mapping[str, str] | None = None,
) -> tuple[list[Job], int]:
    """Pair every audio file under enhanced_dir with its clean (and degraded) counterpart.

    Returns (jobs, number of jobs whose condition was not in the manifest). Files without a clean
    counterpart become jobs with an error, so they are reported like other failures. Raises UserError for
    missing folders or when no file has a counterpart at all.
    """
    enhanced_root, clean_root = Path(enhanced_dir), Path(clean_dir)
    degraded_root = Path(degraded_dir) if degraded_dir is not None else None
    for role, folder in (("enhanced", enhanced_root), ("clean", clean_root), ("degraded", degraded_root)):
        if folder is not None and not folder.is_dir():
            raise UserError(f"{role} folder not found: {folder}")
    files = find_audio_files(enhanced_root)
    if not files:
        raise UserError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {enhanced_root}")

    jobs: list[Job] = []
    not_in_manifest = 0
    for rel in files:
        clean = _counterpart_or_flat(clean_root, rel)
        degraded = _counterpart_or_flat(degraded_root, rel) if degraded_root is not None else None
        condition = rel.parts[0] if len(rel.parts) > 1 else "all"
        if manifest is not None:
            keys = [manifest_key(rel)]
            if clean is not None:
                keys.append(manifest_key(clean.relative_to(clean_root)))
            listed = next((manifest[k] for k in keys if k in manifest), None)
            if listed is None:
                not_in_manifest += 1
            else:
                condition = listed
        error = ""
        if clean is None:
            error = f"no clean counterpart in {clean_root}"
        elif degraded_root is not None and degraded is None:
            error = f"no degraded counterpart in {degraded_root}"
        transcript = None
        if transcripts is not None and clean is not None:
            transcript = transcripts.get(manifest_key(clean.relative_to(clean_root)))
        jobs.append(Job(rel.as_posix(), condition, enhanced_root / rel, clean, degraded, degraded_root is not None, error,
                        transcript))

    if all(job.clean is None for job in jobs):
        raise UserError(
            f"no pairs found: none of the {len(jobs)} audio files in {enhanced_root} has a counterpart in "
            f"{clean_root} (same relative path, or the path without its first folder)"
        )
    return jobs, not_in_manifest


def unmatched_clean(jobs: Sequence[Job], clean_dir: str | Path) -> list[str]:
    """The clean files that no enhanced file was paired with (a folder scored only in part)."""
    paired = {Path(job.clean).resolve() for job in jobs if job.clean is not None}
    root = Path(clean_dir)
    return [rel.as_posix() for rel in find_audio_files(root) if (root / rel).resolve() not in paired]


# ---------------------------------------------------------------------------------------- scoring folders
def evaluate_dirs(
    enhanced_dir: str | Path,
    clean_dir: str | Path,
    degraded_dir: str | Path | None = None,
    manifest: str | Path | Mapping[str, str] | None = None,
    workers: int | None = None,
    dnsmos: bool = True,
    progress: bool = True,
    debug: bool = False,
    extra: Sequence[str] = (),
    transcripts: str | Path | Mapping[str, str] | None = None,
) -> list[dict]:
    """Score every enhanced file; rows sorted by file, failed ones with a non-empty "error".

    `manifest` is a CSV path or an already-read {relative path: condition} mapping; `transcripts` likewise
    ({clean relative path: text}, for the "wer" of `extra`, the opt-in metrics). `workers` processes (default: CPU
    count) each load DNSMOS (and the opt-in models) once; with one worker everything runs in this process.
    """
    if isinstance(manifest, (str, Path)):
        manifest = read_manifest(manifest)
    if isinstance(transcripts, (str, Path)):
        transcripts = read_transcripts(transcripts)
    jobs, _ = build_jobs(enhanced_dir, clean_dir, degraded_dir, manifest, transcripts)
    return score_jobs(jobs, workers=workers, dnsmos=dnsmos, progress=progress, debug=debug, extra=extra)


# ------------------------------------------------------------------------------------------------- output
def metric_columns(rows: Iterable[Mapping]) -> list[str]:
    """Metric columns present in `rows`: enhanced ones in METRICS order, then their degraded_ versions."""
    present = set().union(*(row.keys() for row in rows))
    own = [name for name in METRICS if name in present]
    return own + [DEGRADED_PREFIX + name for name in METRICS if DEGRADED_PREFIX + name in present]


def write_csv(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Write rows atomically (temporary file in the same folder, then rename): a crash never leaves half a CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["file", "condition", *metric_columns(rows), "notes", "error"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(rows)  # floats keep full precision (repr), so re-reading gives the same numbers
    atomic_write(path, text.getvalue().encode())
    return path


def condition_means(rows: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """{condition: {"n": count, metric: mean, ...}} over scored rows, conditions in first-seen order, plus
    an overall row "all" (named "all files" if a condition is itself called "all"). Failed rows are left
    out; a metric missing or infinite in a row is left out of that metric's mean only."""
    scored = [row for row in rows if not row.get("error")]
    columns = metric_columns(scored)
    groups: dict[str, list[Mapping]] = {}
    for row in scored:
        groups.setdefault(str(row["condition"]), []).append(row)
    if len(groups) != 1 or "all" not in groups:
        groups["all files" if "all" in groups else "all"] = scored

    def mean(members: list[Mapping], column: str) -> float:
        values = [float(r[column]) for r in members if r.get(column) not in (None, "")]
        values = [v for v in values if math.isfinite(v)]
        return float(np.mean(values)) if values else math.nan

    return {
        name: {"n": float(len(members)), **{column: mean(members, column) for column in columns}}
        for name, members in groups.items()
        if members
    }


def markdown_table(means: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table of condition_means() output. When degraded_ columns are present each cell reads
    "degraded → enhanced" so the improvement is visible beside the enhanced score."""
    if not means:
        return "(no file could be scored)"
    columns = [c for c in metric_columns(means.values()) if not c.startswith(DEGRADED_PREFIX)]
    with_degraded = any(DEGRADED_PREFIX + c in m for m in means.values() for c in columns)

    def cell(value: float | None, decimals: int) -> str:
        return "–" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"

    header = ["condition", "n"] + [METRICS[c][0] + (" (dB)" if c in ("si_sdr", "lsd") else "") for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for name, values in means.items():
        cells = [name, str(int(values["n"]))]
        for column in columns:
            decimals = METRICS[column][1]
            text = cell(values.get(column), decimals)
            if with_degraded:
                text = f"{cell(values.get(DEGRADED_PREFIX + column), decimals)} → {text}"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    if with_degraded:
        lines.append("")
        lines.append("Cells: degraded input → enhanced output (means over scored files).")
    return "\n".join(lines)


def summarise(rows: Sequence[Mapping]) -> str:
    """Markdown table of per-condition means of evaluate_dirs() rows (failed rows excluded)."""
    return markdown_table(condition_means(rows))


# ------------------------------------------------------------------------------------------------ figures
def plot_spectrograms(
    paths_or_arrays: Sequence[str | Path | np.ndarray],
    titles: Sequence[str],
    out_png: str | Path,
    sample_rate: int = SAMPLE_RATE,
    suptitle: str | None = None,
    dynamic_range_db: float = 80.0,
) -> Path:
    """Stacked log-magnitude spectrograms (one panel per signal, top to bottom) on one colour scale.

    Inputs are audio paths (read with utils.load_audio at `sample_rate`) or mono arrays at `sample_rate`;
    they are trimmed to the shortest so the time axes line up. The scale runs from the loudest bin of all
    panels down `dynamic_range_db`, so a noisier or duller panel really looks noisier or duller. Uses the
    Agg canvas directly (no pyplot, no display needed). Returns the PNG path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(paths_or_arrays) != len(titles) or not titles:
        raise ValueError("need one title per signal and at least one signal")
    signals = [
        load_audio(item, sample_rate)[0] if isinstance(item, (str, Path)) else np.asarray(item, np.float32).reshape(-1)
        for item in paths_or_arrays
    ]
    length = min(len(s) for s in signals)
    n_fft, hop = 512, 128  # finer hop than LSD: smoother pictures of onsets
    spectra = [10.0 * np.log10(power_spectrogram(s[:length], n_fft, hop).T + POWER_FLOOR) for s in signals]
    top = max(float(s.max()) for s in spectra)
    extent = (0.0, length / sample_rate, 0.0, sample_rate / 2000.0)

    figure = Figure(figsize=(10, 2.4 * len(signals) + (0.4 if suptitle else 0.0)), constrained_layout=True)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(signals), 1, sharex=True, squeeze=False)[:, 0]
    image = None
    for ax, spectrum, title in zip(axes, spectra, titles):
        image = ax.imshow(spectrum, origin="lower", aspect="auto", extent=extent, cmap="magma",
                          vmin=top - dynamic_range_db, vmax=top, interpolation="nearest")
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylabel("frequency (kHz)")
    axes[-1].set_xlabel("time (s)")
    figure.colorbar(image, ax=list(axes), label="magnitude (dB)", pad=0.01)
    if suptitle:
        figure.suptitle(suptitle, fontsize=11)

    out_png = Path(out_png)
    atomic_write(out_png, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    return out_png


def _pick_for_figures(rows: Sequence[Mapping], count: int) -> list[Mapping]:
    """Up to `count` scored rows, taken round-robin over conditions so every condition gets shown."""
    by_condition: dict[str, list[Mapping]] = {}
    for row in rows:
        if not row.get("error"):
            by_condition.setdefault(str(row["condition"]), []).append(row)
    picked: list[Mapping] = []
    queues = [list(members) for members in by_condition.values()]
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def write_figures(rows: Sequence[Mapping], jobs: Sequence[Job], count: int, folder: str | Path) -> list[Path]:
    """Spectrogram PNGs (degraded / enhanced / clean) for `count` scored files, named after the file."""
    by_file = {job.file: job for job in jobs}
    written = []
    for row in _pick_for_figures(rows, count):
        job = by_file[row["file"]]
        assert job.clean is not None
        signals: list[Path] = []
        titles: list[str] = []
        if job.degraded is not None:
            signals.append(job.degraded)
            titles.append(f"degraded input: PESQ {row['degraded_pesq']:.2f}, ESTOI {row['degraded_estoi']:.3f}")
        signals += [job.enhanced, job.clean]
        titles += [f"enhanced: PESQ {row['pesq']:.2f}, ESTOI {row['estoi']:.3f}", "clean reference"]
        name = job.file.replace("/", "__").rsplit(".", 1)[0] + ".png"
        written.append(plot_spectrograms(signals, titles, Path(folder) / name,
                                         suptitle=f"{job.file} ({job.condition})"))
    return written


# ---------------------------------------------------------------------------------------------------- CLI
def _grouped_notes(rows: Sequence[Mapping]) -> list[str]:
    """One line per distinct note; a note shared by many files (e.g. resampling) is printed once with a count."""
    files_by_note: dict[str, list[str]] = {}
    for row in rows:
        for note in filter(None, str(row.get("notes", "")).split("; ")):
            files_by_note.setdefault(note, []).append(row["file"])
    lines = []
    for note, files in files_by_note.items():
        where = files[0] if len(files) == 1 else f"{files[0]} and {len(files) - 1} more"
        lines.append(f"note: {where}: {note}")
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--enhanced_dir", required=True, help="folder of enhanced files (may hold condition sub-folders)")
    parser.add_argument("--clean_dir", required=True, help="folder of clean references")
    parser.add_argument("--degraded_dir", help="folder of the degraded inputs, scored too for comparison")
    parser.add_argument("--manifest", help="CSV with columns file,condition giving each file's condition")
    parser.add_argument("--output", default="results.csv", help="per-file CSV (default: results.csv)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: CPU count)")
    parser.add_argument("--figures", type=int, default=0, help="write this many spectrogram comparison PNGs")
    parser.add_argument("--figures_dir", default="figures", help="folder for --figures (default: figures/)")
    parser.add_argument("--no_dnsmos", action="store_true", help="skip DNSMOS (the slowest metric)")
    parser.add_argument("--metrics", help=f"opt-in metrics, comma-separated: {', '.join(OPTIONAL_METRICS)}")
    parser.add_argument("--transcripts", help="CSV with columns file,text (file relative to --clean_dir) for wer")
    parser.add_argument("--allow_incomplete", action="store_true",
                        help="exit 0 although clean files have no enhanced file or lengths differ by more than 1%%")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """The CLI's work; returns the exit code (0 all scored, 1 some failed). Raises UserError."""
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.figures < 0:
        raise UserError(f"--figures must be 0 or more, got {args.figures}")
    output = Path(args.output)
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a file name such as {output / 'results.csv'}")
    if output.suffix.lower() in AUDIO_EXTENSIONS:
        raise UserError(f"--output {output} is named as audio; the per-file scores are a CSV (e.g. results.csv)")
    for name in ("manifest", "transcripts"):
        given = getattr(args, name)
        if given and output.exists() and Path(given).exists() and os.path.samefile(output, given):
            raise UserError(f"--output {output} is the --{name} file; writing the scores would replace it")
    require_writable(output.parent, "--output")  # before the scoring, which is the slow part
    if args.figures:
        require_writable(args.figures_dir, "--figures_dir")
    extra = parse_metrics(args.metrics)
    if "wer" in extra and not args.transcripts:
        raise UserError("--metrics wer needs --transcripts (CSV with columns file,text)")
    transcripts = read_transcripts(args.transcripts) if args.transcripts else None
    manifest = read_manifest(args.manifest) if args.manifest else None
    jobs, not_in_manifest = build_jobs(args.enhanced_dir, args.clean_dir, args.degraded_dir, manifest, transcripts)
    if not_in_manifest:
        print(f"note: files not in the manifest: {not_in_manifest} (condition taken from their folder)",
              file=sys.stderr)
    if "wer" in extra and not any(job.transcript for job in jobs):
        raise UserError(f"--transcripts {args.transcripts}: no clean file of {args.clean_dir} has a transcript there")
    rows = score_jobs(jobs, workers=args.workers, dnsmos=not args.no_dnsmos, debug=args.debug, extra=extra)
    try:
        write_csv(rows, output)
    except OSError as e:  # e.g. the disk filled up while scoring: the table below still shows every mean
        print(f"error: cannot write {output} ({e.strerror or e}); the means are printed below", file=sys.stderr)
        output = None

    for line in _grouped_notes(rows):
        print(line, file=sys.stderr)
    print(summarise(rows))
    missing = unmatched_clean(jobs, args.clean_dir)
    mismatched = [row["file"] for row in rows if "lengths differ" in str(row.get("notes") or "")]
    if missing:
        print(f"missing: {len(missing)} clean files have no enhanced file and are not in the means "
              f"(e.g. {', '.join(missing[:3])})")
    if mismatched:
        print(f"length-mismatched: {len(mismatched)} enhanced files differ in length from their clean file by more "
              f"than {100 * LENGTH_TOLERANCE:g}% and were scored on the shorter (e.g. {', '.join(mismatched[:3])})")
    failed = [row for row in rows if row["error"]]
    if failed:
        print()
        for row in failed:
            print(f"cannot score {row['file']}: {row['error']}")
        print(f"{len(failed)} of {len(rows)} files could not be scored and are left out of the means")
    if output is not None:
        print(f"per-file results: {output}")
    if args.figures:
        for path in write_figures(rows, jobs, args.figures, args.figures_dir):
            print(f"figure: {path}")
    if (missing or mismatched) and not args.allow_incomplete:
        print("exit code 1: the means cover only part of the clean set (--allow_incomplete accepts that)")
        return 1
    return 1 if failed or output is None else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
