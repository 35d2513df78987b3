"""The offline default at reduced size: the README's main job, end to end, as a user runs it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _demo(workdir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainer.demo", "--quick", "--workdir", str(workdir), "--device", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_quick_demo_trains_surrogate_then_sdce_and_standard(tmp_path):
    first = _demo(tmp_path)
    results = (tmp_path / "results.md").read_text()
    losses = {
        name: float(loss)
        for name, loss in re.findall(r"\| (surrogate \(Llama, trained first\)|base \+ SDCE|base, standard CE) \| \w+ \| ([\d.]+) \|", results)
    }
    assert set(losses) == {"surrogate (Llama, trained first)", "base + SDCE", "base, standard CE"}, results
    assert all(0 < loss < 20 for loss in losses.values())
    assert "SDCE - standard eval loss" in results and "SDCE - standard eval loss" in first.stdout
    assert "vocabulary alignment" in first.stderr  # the two tokenizer families really were aligned

    second = _demo(tmp_path)  # prepared assets and the trained surrogate are reused
    assert "reusing the trained surrogate" in second.stderr
    assert "(cached)" in (tmp_path / "results.md").read_text()
