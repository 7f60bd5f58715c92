"""Which recordings the blend should leave to the codec's output alone, simulated from per-file scores.

    python checkpoint.py export pretrained/demo_paragse.pt runs/alone.pt --half --blend null
    python scripts/compare_peers.py --test_dir data/valid_sets --files 40 --peers "" --output_dir runs/switch \
        --checkpoint blend=pretrained/demo_paragse.pt --checkpoint alone=runs/alone.pt
    python research/window_switch.py --test_dir data/valid_sets --files 40 --scores runs/switch \
        --rules "intact<0.15" "intact<0.15&asymmetry>0.05" --output runs/switch/statistics.csv
    python research/window_switch.py --test_dir data/valid_sets --files 40 --scores runs/switch \
        --rules "intact<0.15&asymmetry>0.05" --alone_magnitude

The blend (models/input_blend.py) keeps the degraded input wherever its level allows, which on reverberant input
keeps the reflections too. A switch that gives such a recording the codec's output alone needs a sign, measured on
the degraded recording, of where that is better. Two are computed per recording with the enhancer of --checkpoint
(default: the shipped model), on the whole recording as one window, as inference runs it:
    intact:     the mean probability the model gives the degraded tokens (the blend's `intact`), over groups and
                frames: how much of the input the model itself calls intact;
    asymmetry:  corr(E_D(t), E_P(t - tau)) - corr(E_D(t), E_P(t + tau)), E_D and E_P the log energies per log-mel
                frame of the degraded input and of the predicted clean speech (the blend's band magnitudes summed),
                tau = --tau frames: reverberation leaves energy after the speech that caused it, additive noise as
                much before as after.
A switched recording's output is exactly the codec-alone checkpoint's, so each rule (conditions on the statistics
joined by '&', each NAME<VALUE or NAME>VALUE) is scored from the two systems' per-file scores in --scores, as
compare_peers.py wrote them: PESQ / ESTOI / DNSMOS OVRL per condition and the share of recordings switched.
With --alone_magnitude a switched recording gets instead the codec-alone output's STFT magnitude on the blended
output's phase (the blend's mixing STFT), made from the two systems' outputs in --scores and scored here.
Measured in docs/experiments.md, items 52 and 53.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpu_speed  # noqa: E402  (before torch: the OpenMP wait policy, as in inference.py)

import argparse  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inference import Enhancer  # noqa: E402
from metrics import score_pair  # noqa: E402
from models.input_blend import token_probability  # noqa: E402
from scripts.compare_peers import condition_dirs, file_stem, select_files  # noqa: E402
from utils import UserError, atomic_write, load_audio, normalise_level, run_command  # noqa: E402

METRICS = ("pesq", "estoi", "dnsmos_ovrl")
RULE_PART = re.compile(r"^\s*(intact|asymmetry)\s*([<>])\s*(-?[0-9.]+)\s*$")


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / ((a * a).sum() * (b * b).sum()).clamp(min=1e-20).sqrt())


@torch.inference_mode()
def statistics(enhancer: Enhancer, audio, tau: int) -> dict[str, float]:
    """The two signs of one recording (mono float32 at the enhancer's rate), computed as the pipeline would."""
    wav, _ = normalise_level(torch.from_numpy(audio)[None], enhancer.input_level_db, enhancer.sample_rate)
    padded = enhancer.codec.pad(wav)
    degraded_tokens, analysis, frames = enhancer.encode_and_front(padded)
    group_logits = enhancer.predictor.predict(enhancer.predictor.branch.context(frames), degraded_tokens)
    probabilities = enhancer.probabilities(group_logits)
    predicted = enhancer.codec.decode_latent(enhancer.latent(group_logits, probabilities))
    intact = token_probability(probabilities, degraded_tokens)
    degraded_energy = analysis[0][0].square().sum(dim=0).clamp(min=1e-12).log()
    predicted_energy = enhancer.blend.smooth(predicted.float().exp())[0].square().sum(dim=0).clamp(min=1e-12).log()
    follows = correlation(degraded_energy[tau:], predicted_energy[:-tau])
    precedes = correlation(degraded_energy[:-tau], predicted_energy[tau:])
    return {"intact": float(intact.mean()), "asymmetry": follows - precedes}


def magnitude_on_blend_phase(enhancer: Enhancer, blended: np.ndarray, alone: np.ndarray) -> np.ndarray:
    """The codec-alone output's STFT magnitude with the blended output's phase, in the blend's mixing STFT."""
    frame_stft = enhancer.blend.frame_stft
    length = min(len(blended), len(alone))
    blended_spec, alone_spec = (frame_stft(torch.from_numpy(x[:length])[None]) for x in (blended, alone))
    return frame_stft.inverse(torch.polar(alone_spec.abs(), blended_spec.angle()), length)[0, :length].numpy()


def parse_rule(text: str) -> list[tuple[str, str, float]]:
    parts = [RULE_PART.match(part) for part in text.split("&")]
    if not all(parts):
        raise UserError(f"--rules {text!r}: expected conditions like intact<0.15&asymmetry>0.05")
    return [(m.group(1), m.group(2), float(m.group(3))) for m in parts]


def switched(row: dict[str, float], rule: list[tuple[str, str, float]]) -> bool:
    return all(row[name] < value if op == "<" else row[name] > value for name, op, value in rule)


def read_scores(scores_dir: Path, system: str) -> dict[str, dict]:
    path = scores_dir / f"scores_{file_stem(system)}.csv"
    if not path.is_file():
        raise UserError(f"{path}: no per-file scores of {system!r} (run compare_peers.py with that checkpoint name)")
    with open(path, newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test_dir", type=Path, required=True)
    p.add_argument("--files", type=int, default=40)
    p.add_argument("--min_seconds", type=float, default=1.5, help="as compare_peers.py")
    p.add_argument("--scores", type=Path, required=True, help="compare_peers.py's output folder")
    p.add_argument("--blend", default="blend", help="the blended system's name there")
    p.add_argument("--alone", default="alone", help="the codec-alone system's name there")
    p.add_argument("--checkpoint", type=Path, help="enhancer with inference.blend (default: the shipped model)")
    p.add_argument("--rules", nargs="+", default=["intact<0.15", "intact<0.15&asymmetry>0.05"])
    p.add_argument("--alone_magnitude", action="store_true",
                   help="switched recordings: the codec-alone magnitude on the blend's phase (see above)")
    p.add_argument("--tau", type=int, default=16, help="log-mel frames (2.5 ms each for the demo codec)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", type=Path, help="CSV of every recording's statistics")
    args = p.parse_args(argv)

    def run() -> int:
        rules = {text: parse_rule(text) for text in args.rules}
        blended, alone = read_scores(args.scores, args.blend), read_scores(args.scores, args.alone)
        torch.set_num_threads(args.threads)
        enhancer = Enhancer.load(args.checkpoint, device="cpu").parallelize()
        if enhancer.blend is None:
            raise UserError("the checkpoint has no inference.blend: its statistics need one")
        conditions = condition_dirs(args.test_dir)
        files = select_files(args.test_dir / "clean", conditions, args.files, args.min_seconds)
        rows = []
        for condition, folder in conditions.items():
            for rel in files:
                audio = load_audio(folder / rel, enhancer.sample_rate)[0]
                rows.append({"file": f"{condition}/{rel.as_posix()}", "condition": condition}
                            | statistics(enhancer, audio, args.tau))
        if args.output:
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(args.output, text.getvalue().encode())
        missing = [row["file"] for row in rows if row["file"] not in blended or row["file"] not in alone]
        if missing:
            raise UserError(f"{len(missing)} recordings have no scores in {args.scores} (first: {missing[0]}): "
                            f"score the same --test_dir and --files with compare_peers.py")
        if args.alone_magnitude:  # every recording some rule switches, made and scored once
            for row in rows:
                if any(switched(row, rule) for rule in rules.values()):
                    clean = load_audio(args.test_dir / "clean" / row["file"].split("/", 1)[1], enhancer.sample_rate)[0]
                    outputs = [load_audio(args.scores / name / row["file"], enhancer.sample_rate)[0]
                               for name in (args.blend, args.alone)]
                    alone[row["file"]] = score_pair(magnitude_on_blend_phase(enhancer, *outputs), clean)
        for name, rule in [("blend everywhere", None), *rules.items()]:
            flags = [rule is not None and switched(r, rule) for r in rows]
            cells = []
            for condition in [*conditions, "all"]:
                members = [(r, flag) for r, flag in zip(rows, flags) if condition in ("all", r["condition"])]
                chosen = [(alone if flag else blended)[r["file"]] for r, flag in members]
                means = [sum(float(c[m]) for c in chosen) / len(chosen) for m in METRICS]
                share = sum(flag for _, flag in members) / len(members)
                cells.append(f"{condition} {means[0]:.3f} / {means[1]:.3f} / {means[2]:.2f} ({share:.2f})")
            print(f"{name}: " + " | ".join(cells), flush=True)
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
