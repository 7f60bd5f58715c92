"""`make demo`: enhance the held-out examples with the shipped demo model, score them, write a report.

    python demo.py [--checkpoint pretrained/demo_paragse.pt] [--output_dir outputs/demo] [--no_dnsmos]

Writes outputs/demo/enhanced/<condition>/*.wav, outputs/demo/codec/*.wav (copy-synthesis through the demo
codec: the ceiling of any enhancer built on it), outputs/demo/report.md and outputs/demo/figures/*.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import checkpoint
import evaluate
import inference
from metrics import OPTIONAL_METRICS
from utils import REPO_ROOT, UserError, atomic_write

EXAMPLES = REPO_ROOT / "examples"


def enhance(checkpoint: Path, input_dir: Path, output_dir: Path, codec_only: bool = False) -> None:
    argv = ["--input_dir", str(input_dir), "--output_dir", str(output_dir), "--checkpoint", str(checkpoint),
            "--overwrite", "--device", "cpu"]
    code = inference.main(argv + (["--codec_only"] if codec_only else []))
    if code != 0:
        raise SystemExit(f"enhancement of {input_dir} failed (exit code {code})")


def score(enhanced: Path, clean: Path, degraded: Path | None, dnsmos: bool) -> list[dict]:
    """Every metric, the opt-in ones of generative enhancement included (speaker similarity, ViSQOL, and the word
    error rate against examples/transcripts.csv)."""
    rows = evaluate.evaluate_dirs(enhanced, clean, degraded, manifest=None, dnsmos=dnsmos, progress=True,
                                  extra=OPTIONAL_METRICS, transcripts=EXAMPLES / "transcripts.csv")
    failed = [r for r in rows if r.get("error")]
    for row in failed:
        print(f"cannot score {row['file']}: {row['error']}")
    return rows


def report(rows_enhanced: list[dict], rows_codec: list[dict], checkpoint: Path, figures: list[Path],
           output_dir: Path, decoding: dict) -> Path:
    """decoding: the checkpoint's `inference` section (how token distributions became speech)."""
    how = (f"by expectation at temperature {decoding['temperature']:g}" if decoding["decoding"] == "expected"
           else "by arg-max")
    if decoding.get("blend"):
        how += (", the output blended with the degraded input where the prediction says it is intact "
                f"(inference.blend {decoding['blend']}; `inference.py --no_blend` skips it)")
    lines = [
        "# ParaGSE demo report",
        "",
        f"Model: `{checkpoint.relative_to(REPO_ROOT) if checkpoint.is_relative_to(REPO_ROOT) else checkpoint}` "
        f"(see MODEL_CARD.md for what it was trained on and for how long), tokens decoded {how}.",
        "Input: the held-out clips of `examples/` (never used in training), one folder per distortion.",
        "SpkSim: speaker similarity to the clean clip (resemblyzer, 1 = same voice); ViSQOL: MOS-LQO (speech mode);",
        "WER: word error rate of pocketsphinx's transcription against the prompt's text (0 = every word right).",
        "",
        "## Degraded input → enhanced output, per distortion",
        "",
        evaluate.summarise(rows_enhanced),
        "",
        "## Codec copy-synthesis of the clean clips (the ceiling for any enhancer on this codec)",
        "",
        evaluate.summarise(rows_codec),
        "",
        "## Spectrograms (degraded / enhanced / clean)",
        "",
        *[f"![{p.stem}](figures/{p.name})" for p in figures],
        "",
    ]
    path = output_dir / "report.md"
    atomic_write(path, "\n".join(lines).encode())
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=inference.DEFAULT_ENHANCER)
    p.add_argument("--output_dir", type=Path, default=REPO_ROOT / "outputs" / "demo")
    p.add_argument("--no_dnsmos", action="store_true", help="skip DNSMOS (faster)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    out = args.output_dir
    try:
        decoding = checkpoint.load(args.checkpoint, "enhancer")["inference"]
        enhance(args.checkpoint, EXAMPLES / "degraded", out / "enhanced")
        enhance(args.checkpoint, EXAMPLES / "clean", out / "codec", codec_only=True)  # through the enhancer's codec
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dnsmos = not args.no_dnsmos
    rows_enhanced = score(out / "enhanced", EXAMPLES / "clean", EXAMPLES / "degraded", dnsmos)
    rows_codec = score(out / "codec", EXAMPLES / "clean", None, dnsmos)
    evaluate.write_csv(rows_enhanced + rows_codec, out / "scores.csv")
    figures = []
    for row in [r for r in rows_enhanced if not r.get("error")][:: max(1, len(rows_enhanced) // 5)][:5]:
        rel = Path(row["file"])
        png = out / "figures" / f"{rel.parent.name}_{rel.stem}.png"
        evaluate.plot_spectrograms(
            [EXAMPLES / "degraded" / rel, out / "enhanced" / rel, EXAMPLES / "clean" / rel.name],
            [f"degraded ({rel.parent.name})", "enhanced", "clean"], png)
        figures.append(png)
    path = report(rows_enhanced, rows_codec, args.checkpoint, figures, out, decoding)
    print(f"\nenhanced audio: {out / 'enhanced'}\ncodec copy-synthesis: {out / 'codec'}\n"
          f"report: {path}\nfigures: {out / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
