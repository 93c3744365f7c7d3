r"""DPO training of one TPO iteration (METHOD.md 1.7): M_t from M_{t-1} on the pairs of iteration t.

Arguments are TRL's (``trl.DPOConfig``, ``trl.ModelConfig``) plus the dataset
ones of ``tpo_data.training.TrainArguments``; a recipe passed with ``--config``
sets defaults and the command line overrides them. The logic lives in
``tpo_data.training``; ``tpo-data train ...`` runs the same thing.

# From a local store version (the parent model comes from the version's manifest)
```bash
python trainers/dpo.py --config recipes/dpo-smollm2.yaml \
    --dataset_store outputs/tpo-smollm2/store --dataset_version iter-1 \
    --output_dir outputs/tpo-smollm2/models/iter-1
```

# From a Hub dataset revision, with another model and IRPO's NLL term
```bash
python trainers/dpo.py --config recipes/dpo-smollm2.yaml \
    --dataset_repo user/tpo-pairs --dataset_revision iter-2 \
    --model outputs/tpo-smollm2/models/iter-1 --irpo_alpha 1.0 \
    --output_dir outputs/tpo-smollm2/models/iter-2
```

# Several GPUs
```bash
accelerate launch trainers/dpo.py --config recipes/dpo-smollm2.yaml \
    --dataset_store outputs/tpo-smollm2/store --dataset_version iter-1 \
    --output_dir outputs/tpo-smollm2/models/iter-1 --bf16 true
```
"""

from tpo_data.cli import run_main, setup_logging
from tpo_data.training import parse_args, train


def main() -> None:
    script_args, training_args, model_args = parse_args(prog="trainers/dpo.py")
    train(script_args, training_args, model_args)


if __name__ == "__main__":
    setup_logging()
    run_main(main)
