"""The one checkpoint format: save, load, export, a codec named instead of carried, and conversion of old files.

A codec checkpoint:     {"format", "kind": "codec", "config": the codec's own config, "model": state dict}
An enhancer checkpoint: {"format", "kind": "enhancer", "config": the predictor's own config, "inference": its
                         decoding defaults, "model": state dict, "codec": a codec checkpoint's payload, or a
                         reference {"kind": "codec_reference", "file", "tokenizer_sha256"} to a codec file beside it}
A training checkpoint adds "training": the run's complete config, step, compute seconds, optimiser, scheduler and
RNG states (and the discriminator); `export` drops it, keeping only "history" (step, compute seconds).

Files hold only tensors and plain Python values and load with `torch.load(weights_only=True)`: loading a checkpoint
never runs code from it. Files of the earlier format (a whole-project config per file) are converted once with
`python checkpoint.py convert OLD NEW`.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import sys
from pathlib import Path

import torch

from models import ENHANCERS, build_codec, build_enhancer
from models.codec import Codec, codec_classes
from models.input_blend import settings_problem
from utils import UserError, atomic_write, load_config, run_command

FORMAT = 2
INFERENCE_DEFAULTS_KEYS = ("window_seconds", "overlap_seconds", "decoding", "temperature", "input_level_db", "blend")


# ------------------------------------------------------------------------------------------------ files
def save(path: str | Path, payload: dict, part_bytes: int | None = None) -> None:
    """torch.save atomically: a crash mid-write leaves the previous file intact.

    With `part_bytes`, a file larger than that is written as parts NAME.part1-of-N ... NAME.partN-of-N (for
    transfers that cap a file's size); `load(NAME)` joins them.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    path = Path(path)
    earlier = [path, *part_files(path)]
    if part_bytes is None or len(data) <= part_bytes:
        written = [path]
    else:
        count = -(-len(data) // part_bytes)
        written = [path.with_name(f"{path.name}.part{i + 1}-of-{count}") for i in range(count)]
    for i, target in enumerate(written):
        atomic_write(target, data if len(written) == 1 else data[i * part_bytes:(i + 1) * part_bytes])
    for stale in earlier:  # the other form of an earlier save, removed only once the new one is whole
        if stale not in written and stale.exists():
            stale.unlink()


def part_files(path: str | Path) -> list[Path]:
    """The parts a checkpoint was written in (save with part_bytes), in order; [] for a whole file."""
    path = Path(path)
    found = {}
    for part in path.parent.glob(f"{glob_escape(path.name)}.part*-of-*"):
        index = _part_index(path, part)
        if index is not None:
            found[index] = part
    return [found[k] for k in sorted(found)]


def _part_index(path: Path, part: Path) -> tuple[int, int] | None:
    """(number, count) of NAME.partNUMBER-of-COUNT, or None for another file."""
    number, separator, count = part.name[len(path.name) + len(".part"):].partition("-of-")
    return (int(number), int(count)) if separator and number.isdigit() and count.isdigit() else None


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _read_parts(path: Path) -> bytes:
    parts = part_files(path)
    indices = [_part_index(path, p) for p in parts]
    counts = {count for _, count in indices}
    if len(counts) != 1 or [number for number, _ in indices] != list(range(1, counts.pop() + 1)):
        raise UserError(f"checkpoint {path} is in parts, but they are incomplete or of two writes: "
                        f"{', '.join(p.name for p in parts)}")
    return b"".join(p.read_bytes() for p in parts)


def load(path: str | Path, kind: str | None = None) -> dict:
    """A checkpoint's payload; UserError names the file and the problem."""
    path = Path(path)
    if not path.is_file() and not part_files(path):
        raise UserError(f"checkpoint not found: {path}")
    source = path if path.is_file() else io.BytesIO(_read_parts(path))
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated, foreign or code-carrying files
        reason = type(e).__name__
        if "weights_only" in str(e):
            reason = "it holds objects other than tensors and plain values"
        raise UserError(f"checkpoint {path} is corrupt, not a checkpoint or not safe to load ({reason}); a file of "
                        f"this project's earlier format converts with `python checkpoint.py convert`") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} was not written by this version of the project (no format {FORMAT}); "
                        "convert an earlier one with `python checkpoint.py convert OLD NEW`")
    if kind is not None and payload["kind"] != kind:
        raise UserError(f"checkpoint {path} holds a model of kind '{payload['kind']}', expected '{kind}'")
    return payload


def codec_payload(codec: Codec) -> dict:
    return {"format": FORMAT, "kind": "codec", "config": codec.config, "model": codec.state_dict()}


def enhancer_payload(predictor: torch.nn.Module, codec: dict, inference: dict) -> dict:
    """inference: the run config's `inference` section (the defaults inference.py uses with this model)."""
    return {"format": FORMAT, "kind": "enhancer", "config": predictor.config, "model": predictor.state_dict(),
            "inference": {k: inference[k] for k in INFERENCE_DEFAULTS_KEYS}, "codec": codec}


# ----------------------------------------------------------------------------------------------- models
def _load_state(module: torch.nn.Module, state: dict, source: str | Path, may_be_new: re.Pattern | None = None
                ) -> None:
    """load_state_dict that turns key and shape mismatches into one-line UserErrors naming the source; entries whose
    names `may_be_new` matches may be missing from `state` (they keep the module's own values)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not (may_be_new and may_be_new.match(k))]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{source}: weights do not match the model built from its config ({detail})")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise UserError(f"{source}: config does not match weights at '{key}': model {tuple(own[key].shape)} vs "
                            f"checkpoint {tuple(value.shape)}")
    module.load_state_dict(own | {k: v.to(own[k].dtype) for k, v in state.items()})


def codec_class_of(payload: dict) -> type:
    """The class a codec payload's config names (the class alone, not a model built from it), or a one-line error."""
    classes, name = codec_classes(), payload["config"].get("class")
    if name not in classes:
        raise UserError(f"unknown codec class {name!r} (expected one of {', '.join(classes)})")
    return classes[name]


def tokenizer_digest(payload: dict) -> str:
    """A fingerprint of what decides a codec's tokens (its tokenizer config and weights, as float32): two codecs
    with the same digest give the same tokens, whatever their decoders."""
    codec_class = codec_class_of(payload)
    digest = hashlib.sha256()
    config = {k: payload["config"][k] for k in ("class", *codec_class.tokenizer_keys)}
    digest.update(json.dumps(config, sort_keys=True).encode())
    for key in sorted(filter(codec_class.is_tokenizer_weight, payload["model"])):
        digest.update(key.encode())
        digest.update(payload["model"][key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def codec_reference(payload: dict, codec_path: Path, enhancer_path: Path) -> dict:
    """What an enhancer at `enhancer_path` stores to name (not carry) the codec `payload` read from `codec_path`."""
    relative = os.path.relpath(Path(codec_path).resolve(), Path(enhancer_path).resolve().parent)
    return {"kind": "codec_reference", "file": Path(relative).as_posix(), "tokenizer_sha256": tokenizer_digest(payload)}


def resolve_codec(payload: dict, source: str | Path) -> tuple[dict, Path]:
    """An enhancer's codec payload (following a reference to the file it names) and the file it came from."""
    if payload.get("kind") != "codec_reference":
        return payload, Path(source)
    path = Path(source).parent / payload["file"]
    if not path.is_file():
        raise UserError(f"{source}: its codec {path} is missing (the enhancer names it instead of carrying it)")
    named = load(path, "codec")
    if tokenizer_digest(named) != payload["tokenizer_sha256"]:
        raise UserError(f"{source}: its codec {path} gives other tokens than the codec it was trained on")
    return named, path


def load_codec(path: str | Path) -> Codec:
    """A codec from a codec checkpoint, or the codec of an enhancer checkpoint."""
    payload = load(path)
    if payload["kind"] == "enhancer":
        return codec_from_payload(payload["codec"], path)
    return codec_from_payload(payload, path)


def codec_from_payload(payload: dict, source: str | Path) -> Codec:
    payload, source = resolve_codec(payload, source)
    codec = build_codec(payload["config"])
    _load_state(codec, payload["model"], source)
    return codec.eval()


def load_enhancer(path: str | Path) -> tuple[torch.nn.Module, Codec, dict]:
    """(token predictor, codec, inference defaults) from one enhancer checkpoint."""
    payload = load(path, "enhancer")
    codec = codec_from_payload(payload["codec"], path)
    predictor = build_enhancer(payload["config"], codec)
    _load_state(predictor, payload["model"], path)
    # A checkpoint saved before a setting existed takes the project's default for it.
    defaults = {k: v for k, v in load_config()["inference"].items() if k in INFERENCE_DEFAULTS_KEYS}
    return predictor.eval(), codec, defaults | payload["inference"]


# Parts a config may add to a trained enhancer (--init_from): the token branches' copy prior (docs/experiments.md
# item 24), their conformer blocks and their BiLSTM layers after the first (item 48). The new parts start from their
# own initialisation and the trained ones from the checkpoint; training then fits them together.
GROWABLE = re.compile(r"token_branches\.(copy_prior\.|conformers\.|lstm\.(weight|bias)_(ih|hh)\.[1-9])")


def load_weights(module: torch.nn.Module, payload: dict, source: str | Path, grown: bool = False) -> list[str]:
    """A payload's weights into a model built from the same config (resuming, --init_from); returns the names of
    the parts that start fresh.

    grown (--init_from only): the config may add the parts GROWABLE names, which start from their own
    initialisation.
    """
    may_be_new = GROWABLE if grown else None
    _load_state(module, payload["model"], source, may_be_new)
    new = [k for k in module.state_dict() if may_be_new and may_be_new.match(k) and k not in payload["model"]]
    return sorted({k.rsplit(".", 1)[0] for k in new})


# ----------------------------------------------------------------------------------------------- export
def _cast(payload: dict, half: bool) -> dict:
    """A payload's weights, floating-point ones as float16 with `half`, except a codec's tokenizer weights: they
    decide the tokens (and the digest enhancers name a codec by), so they stay as they are; they are small."""
    keep = codec_class_of(payload).is_tokenizer_weight if payload["kind"] == "codec" else None
    return {k: v.half() if half and v.is_floating_point() and not (keep and keep(k)) else v
            for k, v in payload["model"].items()}


def set_codec_setting(payload: dict, assignment: str, source: str | Path) -> None:
    """Apply 'dotted.key=JSON value' to a codec payload's config, for a setting that leaves its tokens and weights
    as they are (such as griffin_lim.iterations): a tokenizer setting, an unknown key or one that no longer fits the
    weights is refused in one line. A key the file lacks may be added if the codec class takes it (a setting newer
    than the file)."""
    key, sep, text = assignment.partition("=")
    try:
        value = json.loads(text)
    except ValueError:
        value = text  # a bare string
    path = key.split(".")
    if not sep or not all(path):
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. griffin_lim.iterations=14")
    if path[0] in codec_class_of(payload).tokenizer_keys or path[0] == "class":
        raise UserError(f"--set {key}: that setting decides the codec's tokens; retrain instead")
    section = payload["config"]
    for part in path[:-1]:
        if not isinstance(section.get(part), dict):
            raise UserError(f"--set {key}: {source} has no config section {part!r}")
        section = section[part]
    section[path[-1]] = value  # export builds the codec once all are set: a key the class does not take is refused


def export(source: Path, output: Path, half: bool = False, name_codec: Path | None = None,
           decoding: str | None = None, temperature: float | None = None, settings: tuple[str, ...] = (),
           part_bytes: int | None = None, blend: str | None = None) -> dict:
    """Slim copy of a checkpoint for inference: weights (float16 with `half`), configs, history; no training state.

    name_codec: store a reference to that codec file (it must give the same tokens as the enhancer's) instead of
    carrying the codec. decoding / temperature / blend (JSON text: null or as BLEND_EXAMPLE): the
    enhancer's new inference defaults. settings: 'key=value' changes of a codec's non-tokenizer config
    (set_codec_setting). part_bytes: see `save`.
    """
    payload = load(source)
    if settings and payload["kind"] != "codec":
        raise UserError(f"{source}: --set changes a codec checkpoint's settings; this is an {payload['kind']}")
    for assignment in settings:
        set_codec_setting(payload, assignment, source)
    if settings:
        codec_from_payload(payload, source)  # builds it and loads the weights: the new values must fit both
    out = {key: payload[key] for key in ("format", "kind", "config", "inference") if key in payload}
    out["model"] = _cast(payload, half)
    training = payload.get("training", {})
    out["history"] = payload.get("history") or {k: training[k] for k in ("step", "compute_seconds") if k in training}
    if payload["kind"] == "enhancer":
        codec, codec_path = resolve_codec(payload["codec"], source)
        if name_codec is not None:
            named = load(name_codec, "codec")
            if tokenizer_digest(named) != tokenizer_digest(codec):
                raise UserError(f"{name_codec} gives other tokens than the codec {source} was trained on")
            out["codec"] = codec_reference(named, name_codec, output)
        elif payload["codec"].get("kind") == "codec_reference":
            out["codec"] = codec_reference(codec, codec_path, output)  # the same file, named from the new place
        else:
            out["codec"] = {k: codec[k] for k in ("format", "kind", "config")} | {"model": _cast(codec, half)}
        inference = dict(out["inference"])
        inference |= {k: v for k, v in (("decoding", decoding), ("temperature", temperature)) if v is not None}
        if blend is not None:
            inference["blend"] = parse_blend(blend)
        out["inference"] = inference
    elif name_codec or decoding or temperature is not None or blend is not None:
        raise UserError(f"{source}: --name_codec, --decoding, --temperature and --blend apply to enhancer checkpoints")
    save(output, out, part_bytes)
    return out


DECODINGS = ("argmax", "expected")  # how predicted token distributions become a waveform (inference.Enhancer)


def check_decoding(decoding: str, temperature: float, predictor_class: type | None) -> None:
    """Refuse, in one line, a decoding the predictor class cannot do (None: codec copy-synthesis)."""
    if decoding not in DECODINGS:
        raise UserError(f"inference.decoding must be one of {', '.join(DECODINGS)}, not {decoding!r}")
    if not 0 < temperature < math.inf:
        raise UserError(f"inference.temperature must be a finite number above 0, not {temperature}")
    if decoding == "expected" and predictor_class is not None and predictor_class is not ENHANCERS["ParaGSE"]:
        raise UserError("decoding by expectation needs ParaGSE's independent group distributions; the serial "
                        "baseline chooses each stage's token given the ones before")


BLEND_EXAMPLE = ('{"smoothing_frames": 16, "fill_tolerance": 3.0, "band_limit_depth_db": 60.0, '
                 '"band_limit_max_hz": 6000.0, "band_limit_clean_db": [20.0, 35.0]}')
_BLEND_KEYS = {"smoothing_frames", "fill_tolerance"}
# The band-limit rule's: all three or none (none in checkpoints exported before the rule).
_BAND_LIMIT_KEYS = {"band_limit_depth_db", "band_limit_max_hz", "band_limit_clean_db"}


def check_blend(blend: dict | None) -> None:
    """Refuse, in one line, an inference.blend that is neither null nor like BLEND_EXAMPLE: its keys (the band-limit
    rule's three all or none) and then its values, as models/input_blend.py's settings_problem accepts them."""
    if blend is None:
        return
    if not (isinstance(blend, dict) and set(blend) in (_BLEND_KEYS, _BLEND_KEYS | _BAND_LIMIT_KEYS)):
        raise UserError(f"inference.blend must be null or like {BLEND_EXAMPLE} (the band-limit keys all three or "
                        f"none), not {blend!r}")
    problem = settings_problem(**blend)
    if problem:
        raise UserError(f"inference.blend: {problem}")


def parse_blend(text: str) -> dict | None:
    try:
        blend = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"--blend {text!r}: expected JSON, e.g. null or '{BLEND_EXAMPLE}'") from None
    check_blend(blend)
    return blend


# ------------------------------------------------------------------------------------------- conversion
def _legacy_codec(old: dict) -> dict:
    """A codec payload of the earlier format (a whole-project config) in this format."""
    config, state = old["config"], old["model"]
    codec = config["codec"]
    encoder, decoder, quantizer = codec["encoder"], codec["decoder"], codec["quantizer"]
    if encoder.get("kind") == "frame_mean" and decoder.get("skip") and decoder.get("latent_rate_trunk"):
        new_config = {"class": "MelCodec", "sample_rate": config["sample_rate"], "mel": codec["loss"]["mel"],
                      "downsample": encoder["downsample"],
                      "quantizer": {k: quantizer[k] for k in ("num_groups", "codebook_size")},
                      "decoder": {k: decoder[k] for k in ("dim", "intermediate_dim", "num_blocks", "kernel_size",
                                                          "upsample_kernel")},
                      "griffin_lim": codec["griffin_lim"]}
        groups = range(quantizer["num_groups"])
        new_state = {k: v for k, v in state.items() if not k.startswith("quantizer.")}
        new_state["quantizer.codebooks"] = torch.stack([state[f"quantizer.quantizers.{g}.codebook.weight"]
                                                        for g in groups]).float()
    elif (encoder.get("kind", "convnext") == "convnext" and encoder.get("input", "mdct") == "mdct"
          and decoder.get("output", "mdct") == "mdct" and not encoder.get("latent_rate_trunk")
          and not decoder.get("latent_rate_trunk") and quantizer.get("projection", True)):
        new_config = {"class": "MDCTCodec", "sample_rate": config["sample_rate"], "mdct": codec["mdct"],
                      "encoder": {k: encoder[k] for k in ("dim", "intermediate_dim", "num_blocks", "kernel_size",
                                                          "downsample", "latent_dim")},
                      "decoder": {k: decoder[k] for k in ("dim", "intermediate_dim", "num_blocks", "kernel_size",
                                                          "upsample_kernel")},
                      "quantizer": {k: quantizer[k] for k in ("type", "num_groups", "codebook_size", "codebook_dim",
                                                              "dead_code_threshold", "usage_decay")}}
        new_state = dict(state)
    else:
        raise UserError("an experimental codec variant that this version does not build; its code is at the git tag "
                        "experiments-2026-12 (commit 31f805c)")
    return {"format": FORMAT, "kind": "codec", "config": new_config, "model": new_state}


def convert(source: Path, output: Path) -> dict:
    """Write a checkpoint of the earlier format (whole-project config) in this format, weights unchanged.

    The earlier format needs full unpickling (weights_only=False), which can run code: convert only files you
    trust (your own runs). A codec an enhancer names must be converted first, beside the output under the name
    the enhancer uses.
    """
    if not Path(source).is_file():
        raise UserError(f"checkpoint not found: {source}")
    try:
        old = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a checkpoint: torch raises many types
        raise UserError(f"checkpoint {source} is corrupt or not a checkpoint ({type(e).__name__})") from None
    if not isinstance(old, dict) or "kind" not in old or "config" not in old or old.get("format") == FORMAT:
        raise UserError(f"{source} is not a checkpoint of the earlier format")
    history = {k: old[k] for k in ("step", "compute_seconds") if k in old}
    if old["kind"] == "codec":
        new = _legacy_codec(old) | {"history": history}
    elif old["kind"] in ("paragse", "serial"):
        config = old["config"]
        enhancer = {k: v for k, v in config["enhancer"].items() if k != "train"}
        if old["kind"] == "paragse":
            section = {"class": "ParaGSE", **enhancer}
        else:
            section = {"class": "SerialEnhancer", "stft": enhancer["stft"], "conformer": enhancer["conformer"],
                       "branch": enhancer["branch"] | {"lstm_layers": 0,
                                                       "conformer_blocks": config["serial"]["branch_conformer_blocks"]},
                       "generator_conformer_blocks": config["serial"]["generator_conformer_blocks"]}
        if old["codec"].get("kind") == "codec_reference":
            named = Path(output).parent / old["codec"]["file"]  # the converted codec, beside the output
            codec = codec_reference(load(named, "codec"), named, output)
        else:
            codec = _legacy_codec(old["codec"])
        new = {"format": FORMAT, "kind": "enhancer", "config": section, "model": old["model"],
               "inference": {k: config["inference"][k] for k in INFERENCE_DEFAULTS_KEYS}, "codec": codec,
               "history": history}
    else:
        raise UserError(f"{source}: unknown kind {old['kind']!r}")
    save(output, new)
    return new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Export a checkpoint for inference, or convert one of the earlier format.")
    commands = p.add_subparsers(dest="command", required=True)
    e = commands.add_parser("export", help="weights and configs only (no optimiser or RNG state)")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("output", type=Path)
    e.add_argument("--half", action="store_true", help="store floating-point weights as float16 (half the size); "
                   "a codec's tokenizer weights, which decide its tokens, stay as they are")
    e.add_argument("--name_codec", type=Path, help="name this codec file (same tokens) instead of carrying the "
                                                   "codec: it must stay beside the output")
    e.add_argument("--decoding", choices=DECODINGS, help="the enhancer's default decoding")
    e.add_argument("--temperature", type=float, help="the enhancer's default temperature for expected decoding")
    e.add_argument("--blend", metavar="JSON", help="the enhancer's default inference.blend: null (the codec's "
                                                   f"re-synthesis alone) or '{BLEND_EXAMPLE}'")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a codec setting that leaves its tokens and weights alone, e.g. griffin_lim.iterations=14")
    e.add_argument("--part_mib", type=float, help="write a file larger than this many MiB as parts that load() "
                                                  "joins (NAME.part1-of-N, ...)")
    c = commands.add_parser("convert", help="a checkpoint of the earlier format (trusted files only) to this one")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("output", type=Path)
    args = p.parse_args(argv)
    return run_command(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    if args.output.is_dir():
        raise UserError(f"{args.output} is a folder; give the output file's name, e.g. {args.output / 'model.pt'}")
    if args.output.exists() and args.checkpoint.exists() and os.path.samefile(args.output, args.checkpoint):
        raise UserError(f"{args.output} is the checkpoint it would be made from; write it under another name")
    if args.command == "convert":
        out = convert(args.checkpoint, args.output)
    else:
        if args.decoding or args.temperature is not None:
            payload = load(args.checkpoint, "enhancer")
            inference = payload["inference"]
            check_decoding(args.decoding or inference["decoding"],
                           inference["temperature"] if args.temperature is None else args.temperature,
                           ENHANCERS[payload["config"]["class"]])
        if args.part_mib is not None and args.part_mib <= 0:
            raise UserError("--part_mib must be positive")
        out = export(args.checkpoint, args.output, args.half, args.name_codec, args.decoding, args.temperature,
                     tuple(args.set), None if args.part_mib is None else int(args.part_mib * 2**20), args.blend)
    written = [args.output] if args.output.is_file() else part_files(args.output)
    print(f"{args.output}: {sum(f.stat().st_size for f in written) / 1e6:.1f} MB in {len(written)} file(s) "
          f"({out['config']['class']}, "
          f"step {out['history'].get('step')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
