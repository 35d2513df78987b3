"""Train a causal LM with surrogate-guided cross-entropy (SDCE).

    python train.py --base_model gpt2 --surrogate_model Qwen/Qwen3-0.6B \\
        --dataset wikitext --dataset_config wikitext-2-raw-v1 --batch_size 4 --learning_rate 1e-4 --num_epochs 3
    python train.py --standard_training --base_model gpt2 --dataset wikitext
    python train.py --config config.yaml
    torchrun --nproc_per_node=4 train.py --config config.yaml

`python train.py --help` lists every option; README.md explains them.
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
