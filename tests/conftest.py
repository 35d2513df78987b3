"""Test-wide settings: never touch the network, keep every cache inside the work tree."""

import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
_CACHE = _ROOT / ".cache" / "test"

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "HF_HOME": str(_CACHE / "hf"),
    "HF_DATASETS_CACHE": str(_CACHE / "datasets"),
    "WANDB_DIR": str(_CACHE / "wandb"),
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[key] = value
# On shared CPUs, OpenMP threads spinning while they wait slow torch down several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
