"""The jobs behind prepare_data.py, one module per subcommand.

voicebank  VoiceBank+DEMAND resampled to 16 kHz
testsets   the paper's fixed test sets (one folder per degradation condition)
corpus     the offline training corpus decoded from Debian packages (scripts/make_corpus.sh)
examples   examples/: short held-out clips and their degraded versions, small enough to commit
common     what several of them share: parallel runs, atomic CSVs, per-file seeds, degradation for files on disk

Each module's cmd_<name>(args, config) runs its subcommand; prepare_data.py parses the command line.
"""
