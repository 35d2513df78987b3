"""Data-parallel tests: the integration tests' tiny models, trained by torchrun processes (gloo, CPU)."""

from tests.integration.conftest import base_dir, make_config, surrogate_dir, texts, train_file  # noqa: F401
