"""The XLA lane: the integration tests' tiny models, trained through torch_xla on the CPU (PJRT_DEVICE=CPU).

Runs only in the environment scripts/setup_xla_env.sh builds; elsewhere every test
here is skipped because torch_xla cannot be imported.
"""

import os

os.environ.setdefault("PJRT_DEVICE", "CPU")  # before torch_xla is imported

from tests.integration.conftest import base_dir, make_config, surrogate_dir, texts, train_file  # noqa: E402,F401
