#!/usr/bin/env bash
# PIT on the embedded defaults, end to end: set up the machine, then run every stage of
# recipes/pit-smollm2.yaml (preference data, improvement rows, SFT, gap reward model,
# RL round 1, round-2 references, RL round 2, pit-eval). Rerunning skips finished stages.
#   bash scripts/pit.sh [--config recipe.yaml] [--only STAGE] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --vllm
exec .venv/bin/tpo-data pit-run "$@"
