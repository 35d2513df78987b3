"""The A/B command (trainer.ab) on a tiny budget: its report against the runs' own metrics files, reuse, the demo."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from surrogate_server.config_cli import load_yaml, merge
from tests.integration.conftest import SEQ_LEN
from trainer import ab

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ARMS = ("standard", "surrogate", "kl_control")
SEEDS = (42, 43)
T_975_DF1 = 12.706204736174707  # Student's t, two-sided 95%, one degree of freedom (two seeds)


@pytest.fixture
def ab_config(base_dir, surrogate_dir, train_file, tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(base_dir)},
        "surrogate": {"name_or_path": str(surrogate_dir), "k": 8, "probability_threshold": 0.0},
        "data": {"train_file": str(train_file), "max_seq_length": SEQ_LEN, "max_eval_blocks": 8},
        "training": {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 3e-3, "logging_steps": 2,
                     "save_steps": None, "progress_bar": False, "device": "cpu"},
    }))
    return path


def records(directory: Path, section: str) -> list[dict]:
    """A run's metrics.jsonl records of ``section``, read line by line, keys without the prefix."""
    out = []
    for line in (directory / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        values = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith(f"{section}/")}
        if values:
            out.append({"step": record["step"], **values})
    return out


def reference_ratio(curve: list[tuple[int, float]], target: float, steps: int) -> float | None:
    for i, (step, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return step / steps
            before, loss_before = curve[i - 1]
            return (before + (step - before) * (loss_before - target) / (loss_before - loss)) / steps
    return None


def reference_throughput(train: list[dict]) -> tuple[float, float]:
    """Tokens over the logging windows' time (window tokens / window tokens_per_s) and the share spent on guidance."""
    tokens = [r["tokens_seen"] - (train[i - 1]["tokens_seen"] if i else 0) for i, r in enumerate(train)]
    seconds = [t / r["tokens_per_s"] for t, r in zip(tokens, train)]
    waited = sum(s * r["guidance_wait_share"] for s, r in zip(seconds, train))
    return train[-1]["tokens_seen"] / sum(seconds), waited / sum(seconds)


def test_the_report_matches_the_runs_and_a_second_call_reuses_them(ab_config, tmp_path, capsys):
    out = tmp_path / "ab"
    argv = ["--config", str(ab_config), "--output_dir", str(out), "--arms", ",".join(ARMS),
            "--seeds", ",".join(map(str, SEEDS)), "--eval_steps", "2"]
    assert ab.main(argv) == 0
    assert capsys.readouterr().out.count("training ->") == len(ARMS) * len(SEEDS)
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    runs = {(arm, seed): out / arm / f"seed{seed}" for arm in ARMS for seed in SEEDS}
    evals = {key: records(path, "eval") for key, path in runs.items()}
    final = {key: curve[-1]["loss"] for key, curve in evals.items()}
    assert all([r["step"] for r in curve] == [2, 4, 6] for curve in evals.values())

    for arm in ARMS:
        numbers = report["arms"][arm]
        a, b = (final[arm, seed] for seed in SEEDS)
        assert numbers["final_eval_loss"]["seeds"] == {"42": a, "43": b}
        assert numbers["final_eval_loss"]["mean"] == pytest.approx((a + b) / 2, abs=1e-12)
        half = T_975_DF1 * abs(a - b) / 2  # t * s / sqrt(n), s = |a - b| / sqrt(2) for two values
        assert numbers["final_eval_loss"]["ci95"] == pytest.approx(half, rel=1e-9)
        assert f"| {arm} | {(a + b) / 2:.4f} ± {half:.4f} | {a:.4f} | {b:.4f} |" in md
        diffs = [final[arm, seed] - final["standard", seed] for seed in SEEDS]
        if arm != "standard":
            assert numbers["difference"]["mean"] == pytest.approx(sum(diffs) / 2, abs=1e-12)
            assert numbers["difference"]["ci95"] == pytest.approx(T_975_DF1 * abs(diffs[0] - diffs[1]) / 2, rel=1e-9)
            assert f"| {arm} | {sum(diffs) / 2:+.4f} |" in md
        ratios = [reference_ratio([(r["step"], r["loss"]) for r in evals[arm, seed]], final["standard", seed], 6)
                  for seed in SEEDS]
        for got, expected in zip(numbers["step_ratio"]["seeds"].values(), ratios, strict=True):
            assert got == (None if expected is None else pytest.approx(expected, rel=1e-12))
        reached = [r for r in ratios if r is not None]
        assert numbers["step_ratio"]["reached"] == len(reached)
        assert numbers["step_ratio"]["mean"] == (pytest.approx(sum(reached) / len(reached)) if reached else None)
        speeds = [reference_throughput(records(runs[arm, seed], "train")) for seed in SEEDS]
        assert numbers["tokens_per_s"]["mean"] == pytest.approx(sum(s for s, _ in speeds) / 2, rel=1e-9)
        waits = sum(w for _, w in speeds) / 2
        assert numbers["guidance_wait_share"]["mean"] == pytest.approx(waits, rel=1e-9, abs=1e-12)
    assert report["arms"]["standard"]["step_ratio"]["reached"] == len(SEEDS)  # its own final loss, at the latest

    # The control arm really trained against the unigram teacher, with no surrogate model.
    control = yaml.safe_load((runs["kl_control", 42] / "config.yaml").read_text())
    assert control["surrogate"]["control"] == "unigram" and control["training"]["loss_type"] == "kl"
    assert all(r["guided_share"] > 0.5 and r["surrogate_term"] > 0 for r in records(runs["kl_control", 42], "train"))

    teacher = [records(path, "teacher") for path in runs.values()]
    if any(teacher):
        measured = [t[-1]["surrogate_nats_per_byte"] for (arm, _), t in zip(runs, teacher) if t and arm == "surrogate"]
        assert report["teacher"]["nats_per_byte"] == pytest.approx(sum(measured) / len(measured))
    else:
        assert report["teacher"]["nats_per_byte"] is None and "Teacher: not measured" in md

    png = out / "eval_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "![eval curves](eval_curves.png)" in md

    # A second call trains nothing: every run is reused, its files untouched, the report the same.
    stamps = {key: [(path / name).stat().st_mtime_ns for name in ("model.safetensors", "metrics.jsonl")]
              for key, path in runs.items()}
    assert ab.main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("reused") == len(runs) and "training ->" not in second
    assert stamps == {key: [(path / name).stat().st_mtime_ns for name in ("model.safetensors", "metrics.jsonl")]
                      for key, path in runs.items()}
    assert json.loads((out / "report.json").read_text())["arms"] == report["arms"]

    # Any config change trains afresh: the runs of another learning rate are not finished.
    overrides = merge(load_yaml(ab_config), {"training": {"output_dir": str(out), "eval_steps": 2}})
    assert all(ab.finished(run) for run in ab.plan_runs(overrides, ARMS, SEEDS, out))
    changed = merge(overrides, {"training": {"learning_rate": 1e-3}})
    assert not any(ab.finished(run) for run in ab.plan_runs(changed, ARMS, SEEDS, out))


def test_t_quantiles_and_interpolation():
    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 30: 2.0423}  # printed t tables, 95% two-sided
    assert {df: round(ab.t_quantile(df), 4) for df in table} == table
    curve = [(2, 5.0), (4, 4.0), (6, 3.5)]
    assert ab.crossing_step(curve, 4.5) == 3.0 and ab.crossing_step(curve, 5.5) == 2
    assert ab.crossing_step(curve, 3.4) is None


def test_bad_arms_and_seeds_say_what_to_change(capsys):
    assert ab.main(["--arms", "standard,sdce", "--train_file", "x.jsonl"]) == 2
    assert "unknown arm 'sdce'" in capsys.readouterr().err
    assert ab.main(["--seeds", "42,42", "--train_file", "x.jsonl"]) == 2
    assert "distinct" in capsys.readouterr().err


def test_the_demo_setup_reproduces_the_demo(tmp_path):
    """On the demo's quick profile the A/B's runs give trainer.demo's eval losses exactly (its assets and surrogate
    are shared through the work directory)."""
    demo = [sys.executable, "-m", "trainer.demo", "--quick", "--workdir", str(tmp_path), "--device", "cpu"]
    done = subprocess.run(demo, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    argv = ["--demo", "quick", "--demo_workdir", str(tmp_path), "--arms", "standard,surrogate", "--seeds", "42",
            "--device", "cpu"]
    assert ab.main(argv) == 0
    for arm, demo_run in (("standard", "standard"), ("surrogate", "sdce")):
        assert records(tmp_path / "ab" / arm / "seed42", "eval")[-1]["loss"] == \
            records(tmp_path / "runs" / demo_run, "eval")[-1]["loss"], arm
    assert math.isfinite(json.loads((tmp_path / "ab" / "report.json").read_text())["arms"]["surrogate"]
                         ["difference"]["mean"])
