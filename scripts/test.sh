#!/usr/bin/env bash
# Set up the machine and run the whole test suite, real servers included:
# vLLM (started by the tests) and Argilla (started here, stopped on exit).
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --vllm
# Tests that need vLLM or Argilla fail instead of skipping when these are set.
export TPO_REQUIRE_VLLM=1
if [ -z "${ARGILLA_API_URL:-}" ]; then
  trap 'bash scripts/argilla-server.sh stop >/dev/null 2>&1 || true' EXIT
  bash scripts/argilla-server.sh start
  eval "$(bash scripts/argilla-server.sh env)"
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
