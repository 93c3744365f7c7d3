#!/usr/bin/env bash
# Screenshot of the Argilla review UI with one pushed TPO pair (docs/argilla-review.png).
#
#   PYTHON=.venv/bin/python bash scripts/argilla-screenshot.sh [OUT.png]
#
# Starts the local server (scripts/argilla-server.sh) if needed, pushes a
# one-pair demo version through tpo_data.cli_argilla (dataset "tpo-demo-review";
# running again updates it), then drives headless Chromium (Debian's `chromium`):
# a first run signs in through the UI's /sign-in?auth=base64(user:password)
# auto-login into a fresh profile, a second run opens the record with that
# profile and takes the screenshot. PYTHON must have tpo-data installed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-$REPO/docs/argilla-review.png}")"
PYTHON="${PYTHON:-python3}"
STATE="${ARGILLA_STATE_DIR:-$REPO/.cache/argilla}"
DATASET=tpo-demo-review
SIZE="${SCREENSHOT_SIZE:-1440,1150}"

command -v chromium >/dev/null || { echo "chromium is missing: apt-get install -y chromium" >&2; exit 1; }
bash "$REPO/scripts/argilla-server.sh" start
eval "$(bash "$REPO/scripts/argilla-server.sh" env)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" - "$WORK/store" <<'PY'
import sys

import datasets
import yaml

from tpo_data.card import card_metadata
from tpo_data.store import LocalStore

instruction = "Explain in two sentences why the sky is blue."
chosen_thought = (
    "The user wants a short, correct explanation. Key point: Rayleigh scattering goes as 1/wavelength^4, "
    "so blue light is scattered far more than red. Mention why it is not violet. Keep it to two sentences."
)
chosen_response = (
    "Sunlight is scattered by the gas molecules of the air, and short wavelengths scatter much more strongly "
    "(Rayleigh scattering), so blue light reaches our eyes from every direction of the sky. Violet scatters even "
    "more, but the Sun emits less of it and our eyes are less sensitive to it, so the sky looks blue."
)
rejected_thought = "Easy question, the sky reflects the ocean."
rejected_response = "The sky is blue because it reflects the colour of the oceans, which cover most of the Earth."
sep = "\n## Response\n"
pair = {
    "prompt": [{"role": "user", "content": "Think first, then answer.\n" + instruction}],
    "chosen": [{"role": "assistant", "content": chosen_thought + sep + chosen_response}],
    "rejected": [{"role": "assistant", "content": rejected_thought + sep + rejected_response}],
    "instruction_id": "demo-sky-0001",
    "instruction": instruction,
    "category": "science",
    "chosen_thought": chosen_thought,
    "chosen_response": chosen_response,
    "rejected_thought": rejected_thought,
    "rejected_response": rejected_response,
    "chosen_score": 2.31,
    "rejected_score": -0.87,
    "chosen_length": len(chosen_response),
    "rejected_length": len(rejected_response),
    "score_gap": 0.42,
    "rho": 0.0,
    "iteration": 1,
}
header = yaml.safe_dump(card_metadata(["pairs"]), sort_keys=False)
LocalStore(sys.argv[1]).write_version(
    "demo", {"pairs": datasets.Dataset.from_list([pair])}, {"iteration": 1}, f"---\n{header}---\n# demo\n"
)
PY
"$PYTHON" -m tpo_data.cli_argilla argilla push demo --store "$WORK/store" --dataset_name "$DATASET" 2>/dev/null

DATASET_ID="$("$PYTHON" - "$DATASET" <<'PY'
import sys

from tpo_data.curation import connect

print(next(d.id for d in connect().datasets if d.name == sys.argv[1]))
PY
)"

CHROME=(chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update
        --disable-sync --no-first-run --user-data-dir="$WORK/profile" --window-size="$SIZE" --hide-scrollbars)
AUTH="$(printf '%s:%s' argilla "$(cat "$STATE/password")" | base64 -w0)"
# The sign-in page logs in from ?auth= and keeps the session in the profile.
"${CHROME[@]}" --virtual-time-budget=15000 --dump-dom "$ARGILLA_API_URL/sign-in?auth=$AUTH" >/dev/null 2>"$WORK/chromium.log"
mkdir -p "$(dirname "$OUT")"
"${CHROME[@]}" --virtual-time-budget=20000 --screenshot="$OUT" \
  "$ARGILLA_API_URL/dataset/$DATASET_ID/annotation-mode" 2>>"$WORK/chromium.log" >/dev/null
[[ -s "$OUT" ]] || { echo "no screenshot written; chromium said:" >&2; tail -20 "$WORK/chromium.log" >&2; exit 1; }
echo "wrote $OUT"
