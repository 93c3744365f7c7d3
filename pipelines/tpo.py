"""TPO data pipeline: one iteration's preference pairs (METHOD.md 1, steps 1-6).

distilabel pipeline ``load >> generate >> split >> judge >> checkpoint`` (see
``tpo_data.pipeline``): instructions from the built-in set, a local file or a Hub
dataset; K samples per instruction from the configured engine; each sample split
into thought and response; the responses judged (pair-wise LLM judge or reward
model). Then length-controlled pairs are selected and written with every
candidate to the local store as version ``iter-N`` (``tpo_data.pair_data``).

Usage:
    python pipelines/tpo.py --config recipes/tpo-smollm2.yaml
    python pipelines/tpo.py --config recipes/tpo-smollm2.yaml --engine transformers --num_samples 4
    python pipelines/tpo.py --config recipes/tpo-smollm2.yaml --engine openai --base_url http://HOST:8000/v1

Rerunning the same command resumes: finished batches are not generated again, and a
finished iteration only prints its statistics.
"""

from tpo_data.cli import run_main, setup_logging
from tpo_data.iteration import main

if __name__ == "__main__":
    setup_logging()
    run_main(main)
