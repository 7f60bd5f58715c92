"""What a copy prior of fixed strength would do to a trained ParaGSE, before any training (docs/experiments.md, 24).

    git show 4435be9:pretrained/demo_paragse.pt > leg6.pt   # the demo model before it had the prior
    python research/copy_prior_strengths.py --checkpoint leg6.pt --test_dir data/valid_sets --files 8 \
        --log_strengths -2 0 2 4

Adds `enhancer.token_branch.copy_prior` to the checkpoint's predictor (its weights otherwise unchanged; the gate
fixed at strength e^s everywhere) and prints, per condition of a test-set folder as `prepare_data.py testsets`
writes it, over the first --files recordings: the share of frames whose degraded token already is the clean one
(copying), and for the model without the prior and at each strength, the arg-max token accuracy and the squared
error of the expected codebook vector (at the checkpoint's temperature) against the clean token's vector. Inputs
are brought to the inference level first, as inference.py does. Use validation recordings, never the test split.

This file lives in research/, beside the project's modules rather than inside a package, so it puts the repository
root (the parent of research/) on sys.path before importing them.
"""
from __future__ import annotations

import argparse
import copy
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: see the module docstring

import cpu_speed  # noqa: E402,F401  (before torch: it sets the OpenMP wait policy, as in inference.py)

import torch  # noqa: E402

import checkpoint  # noqa: E402
from models import build_enhancer  # noqa: E402
from utils import UserError, find_audio_files, load_audio, normalise_level, run_command  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a ParaGSE enhancer without the copy prior")
    p.add_argument("--test_dir", type=Path, required=True, help="clean/ plus one folder per condition")
    p.add_argument("--files", type=int, default=8, help="recordings per condition")
    p.add_argument("--log_strengths", type=float, nargs="+", default=[-2.0, 0.0, 2.0, 4.0])
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plain, codec, inference = checkpoint.load_enhancer(args.checkpoint)
    payload = checkpoint.load(args.checkpoint, "enhancer")
    section = copy.deepcopy(payload["config"])
    if section.get("token_branch", {}).get("copy_prior") is not None:
        raise UserError(f"{args.checkpoint} already has a copy prior; give a model without one (e.g. leg 6: "
                        "git show 4435be9:pretrained/demo_paragse.pt > leg6.pt)")
    section["token_branch"]["copy_prior"] = {"initial_log_strength": 0.0, "log_strength_scale": 1.0}
    grown = build_enhancer(section, codec).eval()
    checkpoint.load_weights(grown, payload, args.checkpoint, grown=True)
    gate = grown.token_branches.copy_prior.gate
    temperature, level_db = inference["temperature"], inference["input_level_db"]
    conditions = sorted(d.name for d in args.test_dir.iterdir() if d.is_dir() and d.name != "clean")
    for condition in conditions:
        files = [f for f in find_audio_files(args.test_dir / condition) if (args.test_dir / "clean" / f).is_file()]
        totals: dict = defaultdict(list)
        for relative in files[: args.files]:
            degraded = torch.from_numpy(load_audio(args.test_dir / condition / relative, codec.sample_rate)[0])[None]
            clean = torch.from_numpy(load_audio(args.test_dir / "clean" / relative, codec.sample_rate)[0])[None]
            length = min(degraded.shape[-1], clean.shape[-1])
            degraded, gain = normalise_level(degraded[:, :length], level_db, codec.sample_rate)
            clean = (clean[:, :length] - clean[:, :length].mean()) * gain
            with torch.inference_mode():
                padded = codec.pad(degraded)
                degraded_tokens, clean_tokens = codec.encode(padded), codec.encode(codec.pad(clean))
                condition_features = plain.condition(padded)
                target = codec.quantizer.decode(clean_tokens)
                totals["copy"].append(float((degraded_tokens == clean_tokens).float().mean()))
                for strength in [None, *args.log_strengths]:
                    if strength is None:
                        logits = plain.predict(condition_features, degraded_tokens)
                    else:
                        torch.nn.init.constant_(gate.bias, strength)
                        logits = grown.predict(condition_features, degraded_tokens)
                    expected = codec.quantizer.decode_expected((logits / temperature).softmax(dim=-1))
                    totals[strength, "accuracy"].append(float((logits.argmax(-1) == clean_tokens).float().mean()))
                    totals[strength, "error"].append(float(((expected - target) ** 2).mean()))
        mean = {key: sum(values) / len(values) for key, values in totals.items()}
        cells = [f"{'none' if s is None else f'e^{s:g}'}: {mean[s, 'accuracy']:.3f} / {mean[s, 'error']:.3f}"
                 for s in [None, *args.log_strengths]]
        print(f"{condition} ({len(totals['copy'])} files): copying {mean['copy']:.3f}; accuracy / error: "
              + ", ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
