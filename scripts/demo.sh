#!/usr/bin/env bash
# The demo pipeline on an embedded local Ray: mines this project's own git history (always
# present), filters it into CommitPackFT rows, and prints where everything went.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
.venv/bin/octoray mine . --out "$OUT/commits" allow_unlicensed=true
.venv/bin/octoray filter "$OUT/commits" --out "$OUT/sft" tokenizer_rule=false
echo "demo outputs: $OUT/commits (CommitPack rows), $OUT/sft (CommitPackFT rows)"
