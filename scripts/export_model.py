"""Strip a training checkpoint down to what inference needs (weights, config, codec), optionally in float16.

    python scripts/export_model.py training/demo_paragse/checkpoint_00020000.pt pretrained/demo_paragse.pt --half

`--codec CODEC.pt` makes an enhancer carry a later codec than the one it was trained with, provided the later one
tokenises identically: a decoder fine-tuned after `codec.train.freeze_tokenizer_step` (checked weight by weight).
`--name_codec CODEC.pt` makes it name that codec instead of carrying it (a path relative to the output's folder and a
fingerprint of the tokenizer, checked at every load), so an enhancer and a codec shipped together store the codec once.
`--decoding expected --temperature T` records in the output's config (`inference`) how `inference.py` turns the
predicted distributions into speech by default (see inference.Enhancer); choose T on validation data.

The result loads with `Codec.load` / `models.load_enhancer` like any checkpoint (float16 weights are cast back to
float32 on load); it keeps the step and compute hours for the model card.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.codec import TOKENIZER_SECTIONS, Codec  # noqa: E402
from utils import UserError, load_checkpoint, save_checkpoint  # noqa: E402

KEEP = ("kind", "config", "model", "step", "compute_seconds")


def slim(payload: dict, half: bool) -> dict:
    def cast(state: dict) -> dict:
        return {k: v.half() if half and v.is_floating_point() else v for k, v in state.items()}

    out = {key: payload[key] for key in KEEP if key in payload}
    out["model"] = cast(payload["model"])
    if "codec" in payload and payload["codec"]["kind"] == "codec":  # a carried codec: weights and config only
        out["codec"] = {key: payload["codec"][key] for key in ("kind", "config", "model")}
        out["codec"]["model"] = cast(payload["codec"]["model"])
    elif "codec" in payload:  # a named codec
        out["codec"] = payload["codec"]
    return out


def same_tokens_codec(payload: dict, codec_path: Path) -> dict:
    """The codec at `codec_path`, if it gives the same tokens as the codec the enhancer `payload` carries."""
    if "codec" not in payload or payload["codec"].get("kind") != "codec":
        raise UserError("--codec and --name_codec apply to enhancer checkpoints that carry their codec")
    newer = load_checkpoint(codec_path, ("codec",))
    old_config, new_config = payload["codec"]["config"]["codec"], newer["config"]["codec"]
    for section in TOKENIZER_SECTIONS:
        if old_config[section] != new_config[section]:
            raise UserError(f"{codec_path}: codec.{section} differs from the enhancer's codec, so its tokens differ")
    for key in sorted(filter(Codec.is_tokenizer_weight, payload["codec"]["model"])):
        if not torch.equal(payload["codec"]["model"][key].float(), newer["model"][key].float()):
            raise UserError(f"{codec_path}: weight {key} differs from the enhancer's codec, so its tokens differ "
                            "(fine-tune with codec.train.freeze_tokenizer_step to keep them)")
    return newer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--half", action="store_true", help="store floating-point weights as float16 (half the size)")
    codec_choice = p.add_mutually_exclusive_group()
    codec_choice.add_argument("--codec", type=Path,
                              help="carry this codec (same tokens, later decoder) instead of the enhancer's")
    codec_choice.add_argument("--name_codec", type=Path,
                              help="name this codec (same tokens) instead of carrying one: it must stay beside the output")
    p.add_argument("--decoding", choices=("argmax", "expected"), help="store this inference.decoding (enhancers)")
    p.add_argument("--temperature", type=float, help="store this inference.temperature (enhancers)")
    args = p.parse_args(argv)
    try:
        payload = load_checkpoint(args.checkpoint)
        if args.decoding or args.temperature is not None:
            if payload["kind"] != "paragse":
                raise UserError(f"{args.checkpoint}: --decoding and --temperature apply to ParaGSE checkpoints, "
                                f"not {payload['kind']}")
            if args.temperature is not None and not args.temperature > 0:
                raise UserError(f"--temperature must be above 0, not {args.temperature}")
            inference = dict(payload["config"].get("inference", {}))
            inference |= {k: v for k, v in (("decoding", args.decoding), ("temperature", args.temperature))
                          if v is not None}
            payload = payload | {"config": payload["config"] | {"inference": inference}}
        if args.codec:
            payload = payload | {"codec": same_tokens_codec(payload, args.codec)}
        elif args.name_codec:
            named = same_tokens_codec(payload, args.name_codec)
            payload = payload | {"codec": Codec.reference_payload(named, args.name_codec, args.output)}
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_checkpoint(args.output, slim(payload, args.half))
    print(f"{args.output}: {args.output.stat().st_size / 1e6:.1f} MB ({payload['kind']}, step {payload.get('step')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
