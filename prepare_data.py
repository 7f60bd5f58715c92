"""Data preparation: VoiceBank+DEMAND at 16 kHz, the paper's fixed test sets, the offline corpus, examples/.

    python prepare_data.py voicebank --input_dir VB48K --output_dir VB16K
    python prepare_data.py testsets --clean_dir VB16K/clean_testset_wav [--noisy_dir VB16K/noisy_testset_wav] \
        --output_dir data/testsets [--noise_dir data/corpus/noise/test] [--rir_dir DIR] [--seed N]
    python prepare_data.py corpus --output_dir data/corpus          (scripts/make_corpus.sh installs the sources)
    python prepare_data.py examples --corpus_dir data/corpus --output_dir examples

Every range, probability and source path comes from the "data" section of config.json (--config overlays a
partial JSON). All outputs are 16 kHz mono PCM-16 wav, written atomically; a fixed seed gives identical files.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from data_prep.corpus import cmd_corpus
from data_prep.examples import cmd_examples
from data_prep.testsets import cmd_testsets
from data_prep.voicebank import cmd_voicebank
from utils import load_config, run_command


# ======================================================================================================= CLI
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="partial JSON config laid over config.json")
    common.add_argument("--num_workers", type=int, help="processes (default: data.num_workers)")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("voicebank", parents=[common],
                       help="resample a VoiceBank+DEMAND download to 16 kHz, same layout")
    p.add_argument("--input_dir", required=True)
    p.add_argument("--output_dir", required=True)
    p = sub.add_parser("testsets", parents=[common],
                       help="the fixed test sets (noise, reverb, bandlimit, clipping, mixture)")
    p.add_argument("--clean_dir", required=True, help="clean 16 kHz test speech")
    p.add_argument("--noisy_dir", help="official noisy counterparts (same relative paths) for the noise condition")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--noise_dir", default="data/corpus/noise/test", help="test noise (default: %(default)s)")
    p.add_argument("--rir_dir", help="room impulse responses (default: simulate data.testsets.rir_count)")
    p.add_argument("--seed", type=int, help="default: data.testsets.seed")
    p = sub.add_parser("corpus", parents=[common],
                       help="the offline training corpus from Debian packages (scripts/make_corpus.sh)")
    p.add_argument("--output_dir", default="data/corpus")
    p = sub.add_parser("examples", parents=[common], help="examples/: held-out clips and their degraded versions")
    p.add_argument("--corpus_dir", default="data/corpus")
    p.add_argument("--output_dir", default="examples")
    return parser


COMMANDS = {"voicebank": cmd_voicebank, "testsets": cmd_testsets, "corpus": cmd_corpus, "examples": cmd_examples}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return run_command(lambda: COMMANDS[args.command](args, load_config(args.config)) or 0)


if __name__ == "__main__":
    sys.exit(main())
