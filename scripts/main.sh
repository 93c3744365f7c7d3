#!/usr/bin/env bash
# The main job on the embedded defaults: set up the machine, then run two TPO
# iterations with SmolLM2-135M-Instruct (generate -> judge -> store -> DPO, twice)
# and the held-out evaluation. Rerunning resumes and never redoes finished work.
#   bash scripts/main.sh [extra overrides, e.g. --iterations 3 --baseline true]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --vllm
exec .venv/bin/tpo-data iterate --config recipes/tpo-smollm2.yaml --iterations 2 "$@"
