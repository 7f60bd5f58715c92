#!/usr/bin/env bash
# Build the offline training corpus (data/corpus) from Debian packages: real speech, real noise, simulated RIRs.
#
#   sudo scripts/make_corpus.sh [extra arguments for `prepare_data.py corpus`, e.g. --output_dir DIR]
#
# Files already in the output folder are kept, so after a source is added to config.json a rerun decodes only it.
#
# Installs only the packages allowed for training (see shared DATA.md). pocketsphinx-testdata, codec2-examples,
# hedgewars-data and the non-English asterisk sounds are reserved for independent evaluation: never add them here.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  asterisk-core-sounds-en-g722  # en_US_f_Allison prompts (held out: test split only)
  asterisk-core-sounds-en       # the text of those prompts (core-sounds-en.txt.gz), for the word error rate
  ffmpeg                        # decodes the G.722 prompts
  tuxpaint-stamps-default       # read stamp descriptions in 12+ languages, and sound effects (noise)
  fillets-ng-data-cs            # Czech voice acting
  fillets-ng-data-nl            # Dutch voice acting
  klettres-data                 # spoken letters and syllables, one reader per language folder (configs/corpus_more_speakers.json)
  ktuberling-data               # spoken words, one reader per language folder (8/11 kHz ones are skipped)
  gcin-voice                    # Mandarin syllables read by two speakers
  lincity-ng-data               # city ambience (noise)
  sonic-pi-samples              # hiss and ambience (noise)
  megaglest-data                # forest, rain, water and battle ambience of a strategy game (noise); its unit voices are speech
  frozen-bubble-data            # game music (noise)
  xmoto-data                    # game music (noise)
  extremetuxracer-data          # game music and effects (noise)
  alienblaster-data             # game effects (noise)
)

missing=()
for package in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "error: installing ${missing[*]} needs root (run with sudo)" >&2
    exit 2
  fi
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON=python3
[[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
exec "$PYTHON" prepare_data.py corpus --output_dir data/corpus "$@"
