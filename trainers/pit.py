r"""PIT trainers (METHOD.md 2.1-2.4), one stage per call, TRL style.

Stages (logic in ``tpo_data.pit_training``):
    sft     SFTTrainer: improvement prompt (x, y_ref = y_l) -> y_w
    reward  gap reward model R(x, y1, y2), five-term ranking loss over (w,l), (w,w), (l,l), (l,w)
    rl      RLOOTrainer maximizing R(x, y, y_ref) - beta * KL to the SFT model; --round 1|2

Usage (recipe sections sft:/reward:/rl: plus shared keys; command-line flags override):
    python trainers/pit.py sft    --config recipes/pit-smollm2.yaml
    python trainers/pit.py reward --config recipes/pit-smollm2.yaml
    python trainers/pit.py rl     --config recipes/pit-smollm2.yaml --round 1
    python trainers/pit.py rl     --config recipes/pit-smollm2.yaml --round 2 \
        --model outputs/pit-smollm2/rl-1 --kl_reference outputs/pit-smollm2/sft --output_dir outputs/pit-smollm2/rl-2
    python trainers/pit.py sft --help      # every option of a stage

Round 2 reads the references of version pit-rl-refs-2 (pipelines/pit.py --stage refs).
"""

import sys

from tpo_data.cli import run_main, setup_logging
from tpo_data.pit_training import STAGES, main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    if sys.argv[1] not in STAGES:
        print(f"error: unknown stage {sys.argv[1]!r}; use one of: {', '.join(STAGES)}\n{__doc__}", file=sys.stderr)
        sys.exit(2)
    setup_logging()
    run_main(main)
