"""The project's enhancer beside the free enhancers a user could install instead, on the same held-out files.

    pip install -r requirements-peers.txt
    python prepare_data.py testsets --clean_dir data/corpus/test --noise_dir data/corpus/noise/test \
        --output_dir data/test_sets
    python scripts/compare_peers.py --test_dir data/test_sets --files 30 --output_dir outputs/peers
    python scripts/compare_peers.py --test_dir examples --output_dir outputs/peers_examples
    python scripts/compare_peers.py --test_dir data/test_sets --files 30 --output_dir outputs/peers \
        --checkpoint "shipped=pretrained/demo_paragse.pt" --checkpoint "new=runs/x/model.pt"

--test_dir is a test-set folder as `prepare_data.py testsets` writes it (clean/ and one folder per condition) or as
examples/ is laid out (clean/ and degraded/<condition>/). --files N takes N clean recordings (at least
--min_seconds long, evenly spread over the sorted list, so every source of the split is represented) and every
condition of each. Every system (the checkpoint, default the shipped demo model, and each peer of peers.py) enhances
exactly those files on --threads CPU threads, timed; the degraded input is scored as a system of its own. Scores are
evaluate.py's (wide-band PESQ, ESTOI, DNSMOS OVRL and the rest) against the clean files. The clean files themselves
get a reference row with what needs no reference (DNSMOS, and the word error rate with transcripts): what the
non-intrusive metrics say of the targets every system is measured against. --checkpoint may be given several times
(NAME=PATH names its row). A rerun on the same files reuses the scores of the peers, the degraded input and the
clean reference from OUTPUT_DIR (they do not change; scores of an earlier revision of the metrics are not reused)
unless --rescore; checkpoints are always run afresh.

Writes OUTPUT_DIR/<system>/<condition>/..., OUTPUT_DIR/scores_<system>.csv, and the table as OUTPUT_DIR/peers.md
and peers.json (per condition and over all conditions, with each system's real-time factor), and prints it.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the project's modules

import cpu_speed  # noqa: E402  (before torch: the OpenMP wait policy, as in inference.py)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import evaluate  # noqa: E402
import metrics  # noqa: E402
import peers  # noqa: E402
from degradations import CONDITIONS  # noqa: E402
from inference import DEFAULT_ENHANCER, PRECISIONS, Enhancer  # noqa: E402
from research.codec_copy_synthesis import append_curve_point, checkpoint_position  # noqa: E402
from utils import (AudioError, UserError, atomic_write, find_audio_files, load_audio, require_dir,  # noqa: E402
                   require_writable, run_command, save_audio)

SAMPLE_RATE = 16000
TABLE_METRICS = (("pesq", 2), ("estoi", 3), ("dnsmos_ovrl", 2))
EXTRA_TABLE_METRICS = (("spk_sim", 3), ("visqol", 2), ("wer", 3))  # WER: lower is better
DEGRADED = "degraded input"
CLEAN = "clean speech (reference)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test_dir", type=Path, required=True, help="clean/ plus <condition>/ or degraded/<condition>/")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--checkpoint", action="append", default=[],
                   help="[NAME=]PATH of an enhancer of this project, repeatable (default: the shipped demo model)")
    p.add_argument("--rescore", action="store_true", help="score the peers and the input again, not from a rerun")
    p.add_argument("--log_csv", type=Path,
                   help="also log each checkpoint's means over all conditions (keys test/pesq, test/estoi, "
                        "test/dnsmos_ovrl) at its step and compute hours, for research/plot_learning_curve.py")
    p.add_argument("--peers", default=",".join(peers.PEERS), help="comma-separated peers (default: all)")
    p.add_argument("--files", type=int, default=0, help="clean recordings to take (default: all)")
    p.add_argument("--min_seconds", type=float, default=1.5, help="shortest clean recording taken")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every system")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="the checkpoints' token predictors in this precision (inference.py --precision)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="scoring processes")
    p.add_argument("--no_dnsmos", action="store_true", help="skip DNSMOS (the slowest metric)")
    p.add_argument("--metrics", help="opt-in metrics as evaluate.py --metrics (spk_sim,visqol,wer): a second table")
    p.add_argument("--transcripts", type=Path,
                   help="CSV file,text relative to the test set's clean/ (for wer; default: <test_dir>/transcripts.csv "
                        "if there is one)")
    args = p.parse_args(argv)
    if args.files < 0 or args.threads < 1 or args.workers < 1:
        p.error("--files must be 0 or more, --threads and --workers at least 1")
    args.checkpoints = {}
    for item in args.checkpoint or [str(DEFAULT_ENHANCER)]:
        name, _, path = item.rpartition("=")
        args.checkpoints[name or ("ParaGSE (this project)" if len(args.checkpoint) <= 1 else Path(path).stem)] = \
            Path(path)
    return args


def condition_dirs(test_dir: Path) -> dict[str, Path]:
    """{condition: folder of its degraded files} for every condition folder the test set has."""
    root = test_dir / "degraded" if (test_dir / "degraded").is_dir() else test_dir
    found = {c: root / c for c in CONDITIONS if (root / c).is_dir()}
    if not found:
        raise UserError(f"{test_dir}: no condition folder ({', '.join(CONDITIONS)}) in {root}")
    return found


def select_files(clean_dir: Path, conditions: dict[str, Path], count: int, min_seconds: float) -> list[Path]:
    """Relative paths of `count` clean files (0: all) long enough and present in every condition, evenly spread."""
    usable = []
    for rel in find_audio_files(clean_dir):
        try:
            seconds = sf.info(str(clean_dir / rel)).duration
        except RuntimeError:
            continue  # unreadable: evaluate would report it, but there is nothing to compare on
        if seconds >= min_seconds and all((folder / rel).is_file() for folder in conditions.values()):
            usable.append(rel)
    if not usable:
        raise UserError(f"no clean file of {clean_dir} at least {min_seconds} s long has a counterpart in every "
                        f"condition folder")
    if count and count < len(usable):
        usable = [usable[math.floor(i * len(usable) / count)] for i in range(count)]
    return usable


def link_inputs(files: list[Path], clean_dir: Path, conditions: dict[str, Path], output_dir: Path) -> Path:
    """OUTPUT_DIR/clean/<rel> and OUTPUT_DIR/degraded input/<condition>/<rel> as links to the chosen files."""
    for rel in files:
        pairs = [(output_dir / "clean" / rel, clean_dir / rel)]
        pairs += [(output_dir / DEGRADED / c / rel, folder / rel) for c, folder in conditions.items()]
        for link, target in pairs:
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target.resolve())
    return output_dir / "clean"


def enhance_all(name: str, system, files: list[Path], conditions: dict[str, Path], output_dir: Path) -> dict:
    """Run `system` (16 kHz array -> 16 kHz array) on every file of every condition; returns its timing."""
    compute = audio_seconds = 0.0
    failures = []
    for condition, folder in conditions.items():
        for rel in tqdm(files, desc=f"{name}: {condition}", unit="file", leave=False, disable=None):
            audio = load_audio(folder / rel, SAMPLE_RATE)[0]
            started = time.perf_counter()
            try:
                enhanced = system(audio)
            except AudioError as e:
                failures.append(f"{condition}/{rel}: {e}")
                continue
            compute += time.perf_counter() - started
            audio_seconds += audio.size / SAMPLE_RATE
            save_audio(output_dir / name / condition / rel, enhanced, SAMPLE_RATE)
    for failure in failures:
        print(f"{name}: skipped {failure}", file=sys.stderr)
    return {"rtf": compute / audio_seconds if audio_seconds else math.nan, "audio_seconds": audio_seconds,
            "failed": len(failures)}


def project_system(checkpoint: Path, precision: str = "fp32"):
    enhancer = Enhancer.load(checkpoint, device="cpu", precision=precision).parallelize()  # as inference.py runs it
    return lambda audio: enhancer(audio, SAMPLE_RATE)[0]


def file_stem(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def reusable(output_dir: Path, files: list[Path], name: str, scoring: dict) -> dict | None:
    """The result of `name` from an earlier run on exactly these files with the same metrics, if its scores are
    still there."""
    try:
        earlier = json.loads((output_dir / "peers.json").read_text())
    except (OSError, ValueError):
        return None
    result = earlier.get("systems", {}).get(name)
    if (earlier.get("files") != [f.as_posix() for f in files] or earlier.get("scoring") != scoring or not result
            or "means" not in result):
        return None
    return result if (output_dir / f"scores_{file_stem(name)}.csv").is_file() else None


def score_clean(files: list[Path], clean_dir: Path, conditions: dict[str, Path], dnsmos: bool,
                transcripts: dict[str, str] | None) -> tuple[list[dict], dict]:
    """The clean recordings' own scores on the metrics that need no reference: DNSMOS (when `dnsmos`) and, with
    `transcripts`, the word error rate. Every condition is made from the same clean files, so each condition's means
    are theirs. Returns the CSV rows and the result ({"rtf": None, "means", "errors"})."""
    rows = []
    for rel in tqdm(files, desc=CLEAN, unit="file", leave=False, disable=None):
        row: dict = {"file": rel.as_posix(), "condition": "clean"}
        try:
            audio = load_audio(clean_dir / rel, SAMPLE_RATE)[0]
            if dnsmos:
                row.update(metrics.dnsmos_scores(audio))
            transcript = transcripts.get(evaluate.manifest_key(rel)) if transcripts else None
            if transcript is not None:
                row["wer"] = metrics.word_error_rate(audio, transcript)
            row["error"] = ""
        except (AudioError, metrics.MetricError) as e:
            row = {"file": rel.as_posix(), "condition": "clean", "error": str(e)}
        rows.append(row)
    overall = evaluate.condition_means(rows).get("all", {})
    means = {condition: overall for condition in [*conditions, "all"]}
    return rows, {"rtf": None, "means": means, "errors": sum(1 for r in rows if r["error"])}


def table(results: dict[str, dict], columns: tuple[tuple[str, int], ...] = TABLE_METRICS) -> str:
    """Markdown: one row per system, the `columns` metrics per condition and over all, and the RTF; the best
    value of each column in bold (the lowest for WER), the clean reference row not counted."""
    present = set().union(*(r["means"] for r in results.values()))
    conditions = [c for c in CONDITIONS if c in present] + ["all"]
    names = " / ".join(evaluate.METRICS[m][0] for m, _ in columns)
    header = ["system"] + [f"{c}: {names}" for c in conditions] + ["RTF"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---|" * len(conditions) + "---:|"]

    def finite(values: list[float]) -> list[float]:
        return [v for v in values if math.isfinite(v)]

    best = {}
    for c in conditions:
        for m, _ in columns:
            values = finite([r["means"].get(c, {}).get(m, math.nan) for name, r in results.items() if name != CLEAN])
            best[(c, m)] = (min(values) if m == "wer" else max(values)) if values else None

    def cell(values: dict, condition: str, bold: bool) -> str:
        parts = []
        for metric, decimals in columns:
            value = values.get(metric, math.nan)
            text = "–" if not math.isfinite(value) else f"{value:.{decimals}f}"
            is_best = bold and math.isfinite(value) and value == best[(condition, metric)]
            parts.append(f"**{text}**" if is_best else text)
        return " / ".join(parts)

    for name, result in results.items():
        rtf = result.get("rtf")
        cells = [cell(result["means"].get(c, {}), c, bold=name != CLEAN) for c in conditions]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'—' if rtf is None else f'{rtf:.3f}'} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    clean_dir = require_dir(args.test_dir / "clean", "--test_dir clean/")
    conditions = condition_dirs(args.test_dir)
    files = select_files(clean_dir, conditions, args.files, args.min_seconds)
    extra = evaluate.parse_metrics(args.metrics)
    transcripts = args.transcripts or (args.test_dir / "transcripts.csv")
    transcripts = evaluate.read_transcripts(transcripts) if transcripts.is_file() else None
    if "wer" in extra and not transcripts:
        raise UserError(f"--metrics wer needs transcripts: --transcripts, or {args.test_dir / 'transcripts.csv'}")
    for path in args.checkpoints.values():
        if not path.is_file():
            raise UserError(f"--checkpoint not found: {path}")
    # Before the slow part: a checkpoint whose point cannot be logged is refused at once.
    positions = {name: checkpoint_position(path, "enhancer") for name, path in args.checkpoints.items()
                 if args.log_csv}
    peer_names = [n.strip() for n in args.peers.split(",") if n.strip()]
    try:
        systems = {name: project_system(path, args.precision) for name, path in args.checkpoints.items()}
        loaded_peers = {p.name: p for p in peers.load_peers(peer_names).values()}
    except (ImportError, ValueError) as e:
        raise UserError(str(e)) from e
    require_writable(args.output_dir, "--output_dir")
    reference = link_inputs(files, clean_dir, conditions, args.output_dir)
    print(f"{len(files)} clean recordings x {len(conditions)} conditions ({', '.join(conditions)}) from "
          f"{args.test_dir}; systems: {', '.join(systems)}; {args.threads} threads", flush=True)

    scoring = {"dnsmos": not args.no_dnsmos, "metrics": list(extra), "transcripts": bool(transcripts),
               "revision": metrics.METRICS_REVISION}
    results: dict[str, dict] = {}
    for name in [DEGRADED, *loaded_peers]:
        earlier = None if args.rescore else reusable(args.output_dir, files, name, scoring)
        if earlier is not None:
            print(f"{name}: scores of the earlier run on these files reused", flush=True)
            results[name] = earlier
        elif name == DEGRADED:
            results[name] = {"rtf": None}
        else:
            results[name] = enhance_all(name, loaded_peers[name], files, conditions, args.output_dir)
    if scoring["dnsmos"] or "wer" in extra:
        earlier = None if args.rescore else reusable(args.output_dir, files, CLEAN, scoring)
        if earlier is not None:
            results[CLEAN] = earlier
        else:
            print(f"scoring {CLEAN} ...", flush=True)
            rows, results[CLEAN] = score_clean(files, clean_dir, conditions, scoring["dnsmos"],
                                               transcripts if "wer" in extra else None)
            evaluate.write_csv(rows, args.output_dir / f"scores_{file_stem(CLEAN)}.csv")
    for name, system in systems.items():
        results[name] = enhance_all(name, system, files, conditions, args.output_dir)
    order = [CLEAN, DEGRADED, *systems, *loaded_peers]
    results = {name: results[name] for name in order if name in results}
    for name, result in results.items():
        if "means" in result:
            continue
        if result["rtf"] is not None:
            print(f"{name}: RTF {result['rtf']:.4f} over {result['audio_seconds']:.0f} s", flush=True)
        print(f"scoring {name} ...", flush=True)
        rows = evaluate.evaluate_dirs(args.output_dir / name, reference, workers=args.workers,
                                      dnsmos=not args.no_dnsmos, progress=False, extra=extra,
                                      transcripts=transcripts)
        evaluate.write_csv(rows, args.output_dir / f"scores_{file_stem(name)}.csv")
        result["means"] = evaluate.condition_means(rows)
        result["errors"] = sum(1 for r in rows if r.get("error"))
    text = (f"{len(files)} clean recordings of {args.test_dir} x {len(conditions)} conditions, {args.threads} "
            f"threads; the best value of each column in bold.\n\n{table(results)}\n")
    if extra:
        text += (f"\nSpkSim: speaker similarity to the clean file; ViSQOL: MOS-LQO; WER: word error rate against the "
                 f"transcript (lower is better).\n\n{table(results, EXTRA_TABLE_METRICS)}\n")
    atomic_write(args.output_dir / "peers.md", text.encode())
    for name, (step, hours) in positions.items():
        append_curve_point(args.log_csv, step, hours, [results[name]["means"]["all"]])
        print(f"{name}: test means logged at step {step} ({hours:.2f} compute hours) to {args.log_csv}")
    summary = {"test_dir": str(args.test_dir), "files": [f.as_posix() for f in files], "threads": args.threads,
               "scoring": scoring,
               "checkpoints": {name: str(path) for name, path in args.checkpoints.items()}, "systems": results}
    atomic_write(args.output_dir / "peers.json", (json.dumps(summary, indent=2) + "\n").encode())
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    cpu_speed.enable()  # the allocator policy inference.py's command line runs with, so the RTFs are its own
    return run_command(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
