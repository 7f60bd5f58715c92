"""Options for blending the degraded input into the generated speech (models/input_blend.py), scored on a split.

    python research/blend_options.py --test_dir data/valid_sets --files 40 --output_dir runs/blend_options \
        --options none 1,1,1 1,1,8 1,1,16 1,1,32 1,1.25,16 1,0.8,16 0.5,1,16 1.5,1,16 8,1.5,16 8,2,16 16,1.25,16 \
        1,1,16,0.5 1,1,16,1,1.5 1,1,16,1,2 1,1,16,1,3 1,1,16,1,5 1,1,16,1,10

Each option EXPONENT,TOLERANCE,SMOOTHING_FRAMES[,INPUT_WEIGHT[,FILL_TOLERANCE]] generalises the shipped rule: the
input's gain per mel band is INPUT_WEIGHT * min(1, TOLERANCE * P / D) ** EXPONENT and the generated speech fills
sqrt(1 - min(1, FILL_TOLERANCE * gain * D / P) ** 2) (both extra values default to 1), P and D the predicted and
degraded band magnitudes averaged over SMOOTHING_FRAMES; 1,1,N,1,F is the shipped InputBlend with
smoothing_frames N and fill_tolerance F (without its band-limit rule, docs/experiments.md item 34), and "none" the
codec's re-synthesis alone. A steep exponent with a tolerance above 1 keeps the
input only where it is within the tolerance of the prediction and takes the generated speech elsewhere. Every option
enhances the same files (compare_peers.py's choice: --files recordings of every condition) with the same model;
prints PESQ / ESTOI (and DNSMOS OVRL with --dnsmos) per condition, as docs/experiments.md item 26 reports them.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpu_speed  # noqa: E402,F401  (before torch: the OpenMP wait policy, as in inference.py)

import argparse  # noqa: E402

import torch  # noqa: E402

import evaluate  # noqa: E402
from inference import Enhancer  # noqa: E402
from models.input_blend import InputBlend, input_blend_for  # noqa: E402
from scripts.compare_peers import condition_dirs, enhance_all, select_files  # noqa: E402
from utils import run_command  # noqa: E402


class SteepBlend(InputBlend):
    """InputBlend with the input's gain input_weight * min(1, tolerance * P / D) ** exponent (the shipped rule: all
    three 1)."""

    def __init__(self, base: InputBlend, exponent: float, tolerance: float, input_weight: float):
        super().__init__(base.log_mel, base.frame_stft, base.bands_per_group, base.smoothing_frames,
                         base.fill_tolerance)
        self.exponent, self.tolerance, self.input_weight = exponent, tolerance, input_weight

    def gains(self, degraded_bands: torch.Tensor, predicted_bands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.input_weight * (self.tolerance * predicted_bands / degraded_bands).clamp(max=1.0) ** self.exponent
        kept = (self.fill_tolerance * keep * degraded_bands / predicted_bands).clamp(max=1.0)
        return keep, (1.0 - kept.square()).clamp(min=0.0).sqrt()


def parse_option(text: str) -> tuple[str, tuple[float, float, int, float, float] | None]:
    if text == "none":
        return "none", None
    exponent, tolerance, frames, *more = text.split(",")
    weight, fill_tolerance = [float(x) for x in more] + [1.0, 1.0][len(more):]
    name = f"a{exponent}_t{tolerance}_s{frames}" + "".join(f"_{k}{v}" for k, v in zip(("w", "f"), more))
    return name, (float(exponent), float(tolerance), int(frames), weight, fill_tolerance)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test_dir", type=Path, required=True)
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, help="enhancer (default: the shipped demo model)")
    p.add_argument("--files", type=int, default=40)
    p.add_argument("--min_seconds", type=float, default=1.5, help="as compare_peers.py")
    p.add_argument("--options", nargs="+", default=["none", "1,1,16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dnsmos", action="store_true")
    args = p.parse_args(argv)

    def run() -> int:
        torch.set_num_threads(args.threads)
        conditions = condition_dirs(args.test_dir)
        clean_dir = args.test_dir / "clean"
        files = select_files(clean_dir, conditions, args.files, args.min_seconds)
        enhancer = Enhancer.load(args.checkpoint, device="cpu", blend=False).parallelize()
        for name, option in map(parse_option, args.options):
            if option is None:
                enhancer.blend = None
            else:
                exponent, tolerance, frames, weight, fill_tolerance = option
                enhancer.blend = SteepBlend(input_blend_for(enhancer.codec, frames, fill_tolerance), exponent,
                                            tolerance, weight)
            enhance_all(name, lambda audio: enhancer(audio, 16000)[0], files, conditions, args.output_dir)
            rows = []
            for condition in conditions:
                scored = evaluate.evaluate_dirs(args.output_dir / name / condition, clean_dir, dnsmos=args.dnsmos,
                                                progress=False)
                rows += [row | {"condition": condition} for row in scored]
            evaluate.write_csv(rows, args.output_dir / f"scores_{name}.csv")
            means = evaluate.condition_means(rows)
            keys = ("pesq", "estoi") + (("dnsmos_ovrl",) if args.dnsmos else ())
            print(name, " | ".join(f"{c} " + " / ".join(f"{m[k]:.3f}" for k in keys) for c, m in means.items()),
                  flush=True)
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
