#!/usr/bin/env bash
# The main job on the embedded defaults: set up the machine, then run the TPO
# recipe for SmolLM2-135M-Instruct. Rerunning resumes and never redoes finished work.
#   bash scripts/main.sh [extra overrides, e.g. --engine transformers]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --vllm
exec .venv/bin/python pipelines/tpo.py --config recipes/tpo-smollm2.yaml "$@"
