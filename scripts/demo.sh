#!/usr/bin/env bash
# The demo pipeline (jobs/demo.yaml) on an embedded local Ray: mines this project's own git
# history, filters it, trains a tiny model, serves it, evaluates a HumanEvalPack slice through the
# endpoint and writes runs/demo/report/report.md. Rerunning skips every finished stage.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
data_dir=()
if [ -d "$SHARED/humanevalpack" ]; then
  data_dir=(--humanevalpack-dir "$SHARED/humanevalpack")   # the local copy; without it, the hub
fi
exec .venv/bin/octoray pipeline jobs/demo.yaml "${data_dir[@]}" "$@"
