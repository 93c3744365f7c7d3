r"""PIT data pipeline (METHOD.md 2): preference data -> improvement rows and round-2 references.

Writes two versions to the local store (see ``tpo_data.pit_data``):
``pit-sft-1`` (configs train/test: x, y_ref = rejected, y_better = chosen, and the
improvement prompt/completion for SFT) and ``pit-rl-refs-2`` (answers sampled from
``--model`` with a distilabel TextGeneration step, the y_ref of RL round 2).

Usage:
    python pipelines/pit.py --config recipes/pit-smollm2.yaml --preferences prefs.jsonl
    python pipelines/pit.py --config recipes/pit-smollm2.yaml --preferences outputs/tpo-smollm2/store/iter-1
    python pipelines/pit.py --config recipes/pit-smollm2.yaml --preferences Anthropic/hh-rlhf --max_preferences 2000
    python pipelines/pit.py --config recipes/pit-smollm2.yaml --stage refs --model outputs/pit-smollm2/rl-1 \
        --refs_version pit-rl-refs-2-rl1

Recipe keys come from its ``pipeline:`` section and the shared top-level keys; any key
can be overridden on the command line. A Hub dataset is read from the local cache only.
"""

from tpo_data.cli import run_main, setup_logging
from tpo_data.pit_data import main

if __name__ == "__main__":
    setup_logging()
    run_main(main)
