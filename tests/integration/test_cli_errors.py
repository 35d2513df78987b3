"""``python train.py`` with a user error found at start-up: exit code 2, one message, no traceback.

tests/unit/test_config.py checks every user error through ``trainer.cli.main`` in-process;
this runs the real entry point once, for the error raised deepest into start-up (the
tokenizer of a hub name while offline: 35 frames of traceback before ``main()`` caught it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_config import START_UP_ERRORS, _assert_one_message, start_up_argv

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_train_py_reports_a_start_up_error_in_one_message(tmp_path):
    case = "hub name offline"
    done = subprocess.run([sys.executable, "train.py", *start_up_argv(case, tmp_path)], cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=False)
    _assert_one_message(done.returncode, done.stderr, START_UP_ERRORS[case][1])
