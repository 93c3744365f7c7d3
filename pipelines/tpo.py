"""TPO data pipeline: thought-prompted samples for one iteration (METHOD.md 1, steps 1-3).

distilabel pipeline ``load >> generate >> split`` (see ``tpo_data.pipeline``):
instructions from the built-in set, a local file or a Hub dataset; K samples per
instruction from the configured engine; each sample split into thought and response.

Usage:
    python pipelines/tpo.py --config recipes/tpo-smollm2.yaml
    python pipelines/tpo.py --config recipes/tpo-smollm2.yaml --engine transformers --num_samples 4
    python pipelines/tpo.py --config recipes/tpo-smollm2.yaml --engine openai --base_url http://HOST:8000/v1

Rerunning the same command resumes: finished batches come from distilabel's cache.
"""

from tpo_data.cli import run_main, setup_logging
from tpo_data.iteration import main

if __name__ == "__main__":
    setup_logging()
    run_main(main)
