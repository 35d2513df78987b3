"""Does guidance help here? An A/B of the loss types on your base, data, budget and seeds.

    python -m trainer.ab --config config.yaml                      # standard, surrogate, kl x seeds 42, 43, 44
    python -m trainer.ab --config config.yaml --arms standard,kl,kl_control --seeds 1,2,3,4,5 --max_steps 2000
    python -m trainer.ab --config config.yaml --surrogate_endpoint gpu-node:50051 --nproc_per_node 4
    python -m trainer.ab --demo --arms standard,surrogate --seeds 42   # the offline demo's setup (trainer.demo)
    sdce-ab ...                                                     # the same, as a console script

Every train.py flag works here and applies to every run; ``--arms`` and ``--seeds`` set each
run's ``loss_type``, ``surrogate.control`` and ``seed``. Each arm x seed is one ordinary
training run (``trainer.train.train``: in this process, or under torchrun with
``--nproc_per_node N``) in ``OUTPUT_DIR/<arm>/seed<seed>``, evaluated every ``--eval_steps``
(default: about 10 evaluations over the run). A run whose directory holds the finished result of
the same resolved config is reused, so a stopped A/B continues where it stopped and more seeds
add runs; any config change trains afresh.

Arms: ``standard``, ``surrogate`` and ``kl`` are the loss types (docs/method.md §4);
``surrogate_control`` and ``kl_control`` are the same losses against a teacher that knows
nothing of the text (``trainer.control.UnigramTeacher``): what a loss gains there is
regularisation, and the real surrogate's gain beyond it is its knowledge.

``OUTPUT_DIR/report.md`` (with ``eval_curves.png``) and ``report.json`` hold: the final eval
loss per arm (mean, 95% t-interval, each seed), paired differences against standard (same seed)
with 95% t-intervals, the step ratio (the steps an arm needs to reach standard's final eval
loss, interpolated on its eval curve, over standard's steps), tokens/s and guidance wait per arm,
and the teacher's strength in nats per byte where the runs measured it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from surrogate_server import config_cli
from surrogate_server.config_cli import Overrides, merge
from surrogate_server.source import SurrogateUnavailable
from trainer.config import SECTIONS, TrainConfig, TrainingConfig, build_config
from trainer.tracking import read_metrics

# arm -> (training.loss_type, surrogate.control)
ARMS = {
    "standard": ("standard", "none"),
    "surrogate": ("surrogate", "none"),
    "kl": ("kl", "none"),
    "surrogate_control": ("surrogate", "unigram"),
    "kl_control": ("kl", "unigram"),
}
DEFAULT_ARMS = "standard,surrogate,kl"
DEFAULT_SEEDS = "42,43,44"
EVALS_PER_RUN = 10  # the default eval cadence: about this many evaluations over a run
MARKER = "ab_run.json"  # written in a run's directory once it finished: its resolved config and final step
REFERENCE = "standard"  # the arm the others are compared with


@dataclass
class Run:
    arm: str
    seed: int
    config: TrainConfig

    @property
    def directory(self) -> Path:
        return Path(self.config.training.output_dir)

    @property
    def name(self) -> str:
        return f"{self.arm} seed {self.seed}"


# -- the runs -------------------------------------------------------------------------
def plan_runs(overrides: Overrides, arms: Sequence[str], seeds: Sequence[int], root: Path, nproc: int = 1) -> list[Run]:
    """One config per arm x seed: ``overrides`` (the user's, on the defaults) with the arm's loss, the seed, the
    run's directory and the eval cadence; a config error is a ValueError naming the arm."""
    training = overrides.get("training") or {}
    eval_steps = training.get("eval_steps")
    if eval_steps is None:  # every run has the same budget: the first one's
        first = _arm_config(overrides, arms[0], seeds[0], root)
        eval_steps = max(1, round(planned_steps(first, nproc) / EVALS_PER_RUN))
    return [Run(arm, seed, _arm_config(overrides, arm, seed, root, eval_steps)) for arm in arms for seed in seeds]


def _arm_config(overrides: Overrides, arm: str, seed: int, root: Path, eval_steps: int | None = None) -> TrainConfig:
    loss_type, control = ARMS[arm]
    training = {"loss_type": loss_type, "seed": seed, "output_dir": str(root / arm / f"seed{seed}"),
                "overwrite_output_dir": True, **_wandb_names(overrides.get("training") or {}, arm, seed)}
    if eval_steps is not None:
        training["eval_steps"] = eval_steps
    try:
        return build_config(merge(overrides, {"training": training, "surrogate": {"control": control}}))
    except ValueError as err:
        raise ValueError(f"arm {arm}: {err}") from err


def _wandb_names(training: dict[str, Any], arm: str, seed: int) -> dict[str, str]:
    """With a W&B project: each run named by arm and seed (after the given name) and tagged with its arm."""
    if not training.get("wandb_project"):
        return {}
    prefix = f"{training['wandb_run_name']}-" if training.get("wandb_run_name") else "ab-"
    tags = ",".join(filter(None, [training.get("wandb_tags"), "ab", arm]))
    return {"wandb_run_name": f"{prefix}{arm}-seed{seed}", "wandb_tags": tags}


def planned_steps(config: TrainConfig, world_size: int) -> int:
    """The optimizer steps a run of ``config`` takes on ``world_size`` ranks (with num_epochs: from the data)."""
    cfg = config.training
    if cfg.max_steps > 0:
        return cfg.max_steps
    from trainer.data import build_lm_datasets
    from trainer.models import load_tokenizer
    from trainer.train import StepPlan

    train_set, _ = build_lm_datasets(config.data, load_tokenizer(config.model), seed=cfg.seed)
    return StepPlan.make(len(train_set) // world_size // cfg.per_device_train_batch_size, cfg).total_steps


def finished(run: Run) -> bool:
    """Whether ``run.directory`` holds the finished run of exactly ``run.config``: the marker written after it ended
    and the run's own config.yaml both equal the resolved config, its final model is saved and its metrics end
    with the eval of its last step."""
    marker, resolved = run.directory / MARKER, run.config.to_yaml()
    saved = run.directory / "config.yaml"
    needed = (marker, saved, run.directory / "config.json", run.directory / "metrics.jsonl")
    if not all(path.is_file() for path in needed):
        return False
    done = json.loads(marker.read_text())
    if done.get("config") != resolved or saved.read_text() != resolved:
        return False
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    evals = read_metrics(run.directory, "eval")
    return any((run.directory / name).is_file() for name in weights) and bool(evals) and \
        evals[-1]["step"] == done.get("final_step")


def execute(run: Run, nproc: int) -> None:
    """Train ``run`` (in this process, or ``nproc`` torchrun ranks) and mark it finished."""
    run.directory.mkdir(parents=True, exist_ok=True)
    (run.directory / MARKER).unlink(missing_ok=True)
    if nproc > 1:
        _torchrun(run.config, nproc)
    else:
        from trainer.train import train  # the heavy part, imported only when training

        train(run.config)
    evals = read_metrics(run.directory, "eval")
    if not evals:
        raise ValueError(f"{run.name} logged no eval loss in {run.directory}/metrics.jsonl")
    marker = {"config": run.config.to_yaml(), "final_step": evals[-1]["step"], "eval_loss": evals[-1]["loss"]}
    (run.directory / MARKER).write_text(json.dumps(marker, indent=2))


def _torchrun(config: TrainConfig, nproc: int) -> None:
    """One run as ``nproc`` torchrun ranks on this host, from its resolved config (train.py's command line)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=".ab-", dir=Path(config.training.output_dir).parent,
                                     delete=False) as handle:
        handle.write(config.to_yaml())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "trainer.cli", "--config", handle.name]
    try:
        done = subprocess.run(command, check=False)
    finally:
        os.unlink(handle.name)
    if done.returncode != 0:
        raise ValueError(f"the run in {config.training.output_dir} failed (exit code {done.returncode}): "
                         f"see its log above; rerun to continue (finished runs are reused)")


def run_all(runs: list[Run], nproc: int, say: Callable[[str], None] = print) -> None:
    """Train the runs not finished yet, in order, reporting progress."""
    for i, run in enumerate(runs, 1):
        head = f"[ab {i}/{len(runs)}] {run.name}"
        if finished(run):
            say(f"{head}: reused {run.directory} (eval loss {read_metrics(run.directory, 'eval')[-1]['loss']:.4f})")
            continue
        say(f"{head}: training -> {run.directory}")
        started = time.perf_counter()
        execute(run, nproc)
        loss = read_metrics(run.directory, "eval")[-1]["loss"]
        say(f"{head}: done in {time.perf_counter() - started:.0f} s, eval loss {loss:.4f}")


# -- statistics ---------------------------------------------------------------------------
def t_quantile(df: int, confidence: float = 0.95) -> float:
    """The two-sided ``confidence`` quantile of Student's t with ``df`` (integer) degrees of freedom.

    Bisection on the closed form of P(|T| <= t) for integer df (Abramowitz & Stegun 26.7.3-4).
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    low, high = 0.0, 1.0
    while _t_central(high, df) < confidence:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_central(middle, df) < confidence else (low, middle)
    return (low + high) / 2


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df``."""
    theta = math.atan(t / math.sqrt(df))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ... up to c^(df-3)))
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    for j in range(1, df // 2):  # even: sin (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2))
        term *= c2 * (2 * j - 1) / (2 * j)
        total += term
    return math.sin(theta) * total


def interval(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and the half-width of its 95% t-interval (None for one value)."""
    n = len(values)
    half = t_quantile(n - 1) * stdev(values) / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": mean(values), "ci95": half}


def crossing_step(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """The first step at which the eval curve ``[(step, loss), ...]`` reaches ``target`` (loss <= target), linearly
    interpolated between the evaluation before and the first one at or below it; the first evaluation's step when
    that one already is; None when the curve never gets there."""
    previous = None
    for step, loss in curve:
        if loss <= target:
            if previous is None:
                return step
            (step0, loss0) = previous
            return step0 + (loss0 - target) / (loss0 - loss) * (step - step0)
        previous = (step, loss)
    return None


def throughput(train_records: Sequence[dict[str, float]]) -> tuple[float | None, float | None]:
    """(tokens/s, guidance wait share) of a run: its tokens over the time of its logging windows (each window's
    tokens / its tokens_per_s), and the share of that time the loop waited on guidance."""
    seconds, waited, previous = 0.0, 0.0, 0.0
    for record in train_records:
        tokens, rate = record["tokens_seen"] - previous, record["tokens_per_s"]
        previous = record["tokens_seen"]
        if rate > 0:
            seconds += tokens / rate
            waited += record.get("guidance_wait_share", 0.0) * tokens / rate
    if seconds <= 0:
        return None, None
    return previous / seconds, waited / seconds


# -- the report ---------------------------------------------------------------------------
def run_summary(directory: Path) -> dict[str, Any]:
    """What the report needs of one finished run, from its metrics.jsonl."""
    evals = read_metrics(directory, "eval")
    tokens_per_s, wait = throughput(read_metrics(directory, "train"))
    teacher = read_metrics(directory, "teacher")
    return {
        "curve": [(record["step"], record["loss"]) for record in evals],
        "final_step": evals[-1]["step"],
        "eval_loss": evals[-1]["loss"],
        "nats_per_byte": evals[-1].get("nats_per_byte"),
        "tokens_per_s": tokens_per_s,
        "guidance_wait_share": wait,
        "teacher_nats_per_byte": teacher[-1].get("surrogate_nats_per_byte") if teacher else None,
        "base_nats_per_byte": teacher[-1].get("base_nats_per_byte") if teacher else None,
    }


def summarise(runs: list[Run]) -> dict[str, Any]:
    """The report's numbers (report.json) from the finished runs."""
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        by_arm.setdefault(run.arm, {})[run.seed] = run_summary(run.directory)
    reference = by_arm.get(REFERENCE)
    arms = {arm: _arm_summary(seeds, reference) for arm, seeds in by_arm.items()}
    return {"arms": arms, "teacher": _teacher(by_arm, arms), "seeds": sorted({run.seed for run in runs})}


def _arm_summary(seeds: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]] | None) -> dict[str, Any]:
    def per_seed(key: str) -> dict[str, Any]:
        return {str(seed): summary[key] for seed, summary in seeds.items()}

    def averaged(key: str) -> dict[str, Any]:
        values = [summary[key] for summary in seeds.values() if summary[key] is not None]
        return {"seeds": per_seed(key), "mean": mean(values) if values else None}

    out = {
        "final_eval_loss": {"seeds": per_seed("eval_loss"), **interval([s["eval_loss"] for s in seeds.values()])},
        "tokens_per_s": averaged("tokens_per_s"),
        "guidance_wait_share": averaged("guidance_wait_share"),
        "nats_per_byte": averaged("nats_per_byte"),
        "teacher_nats_per_byte": averaged("teacher_nats_per_byte"),
        "curve": _mean_curve(seeds),
    }
    if reference is not None:
        out.update(_against_reference(seeds, reference))
        if seeds is reference:
            out["difference"] = None
    return out


def _against_reference(seeds: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Paired differences with the reference arm's run of the same seed, and the step ratio per seed."""
    paired = sorted(set(seeds) & set(reference))
    differences = {str(s): seeds[s]["eval_loss"] - reference[s]["eval_loss"] for s in paired}
    ratios: dict[str, float | None] = {}
    for s in paired:
        step = crossing_step(seeds[s]["curve"], reference[s]["eval_loss"])
        ratios[str(s)] = None if step is None else step / reference[s]["final_step"]
    reached = [r for r in ratios.values() if r is not None]
    return {
        "difference": {"seeds": differences, **interval(list(differences.values()))} if paired else None,
        "step_ratio": {"seeds": ratios, "reached": len(reached), "n": len(ratios),
                       "mean": mean(reached) if reached else None},
    }


def _mean_curve(seeds: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The arm's eval curve: the mean over seeds at the steps every seed evaluated, and each seed's."""
    curves = {seed: dict(summary["curve"]) for seed, summary in seeds.items()}
    steps = sorted(set.intersection(*(set(curve) for curve in curves.values())))
    return {"steps": steps, "mean": [mean(curve[s] for curve in curves.values()) for s in steps],
            "seeds": {str(seed): [list(point) for point in summary["curve"]] for seed, summary in seeds.items()}}


def _teacher(by_arm: dict[str, dict[int, dict[str, Any]]], arms: dict[str, Any]) -> dict[str, Any]:
    """The surrogate's strength: its nats/byte (as the guided, non-control runs measured it) against the reference
    arm's final base; None where not measured."""
    measured = [s["teacher_nats_per_byte"] for arm, seeds in by_arm.items() if ARMS[arm][1] == "none"
                for s in seeds.values() if s["teacher_nats_per_byte"] is not None]
    at_start = [s["base_nats_per_byte"] for arm, seeds in by_arm.items() if ARMS[arm][1] == "none"
                for s in seeds.values() if s["base_nats_per_byte"] is not None]
    teacher = mean(measured) if measured else None
    base = arms.get(REFERENCE, {}).get("nats_per_byte", {}).get("mean")
    advantage = 100 * (base - teacher) / base if teacher is not None and base else None
    return {"nats_per_byte": teacher, "base_nats_per_byte_at_start": mean(at_start) if at_start else None,
            "reference_final_nats_per_byte": base, "advantage_over_reference_pct": advantage}


def _number(value: float | None, fmt: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, fmt)


def markdown(report: dict[str, Any], plot: str | None) -> str:
    """report.md: the tables of ``report`` (summarise's numbers) and the plot."""
    seeds, arms = report["seeds"], report["arms"]
    seed_heads = "".join(f" seed {s} |" for s in seeds)
    rule = "|---" * (len(seeds) + 2) + "|"
    lines = [f"# A/B: {', '.join(arms)} x seeds {', '.join(map(str, seeds))}", "",
             *report["settings"], "", "## Final eval loss", "",
             "Mean ± the half-width of its 95% t-interval over seeds (n/a with one seed), then each seed's.", "",
             f"| arm | eval loss |{seed_heads}", rule]
    for arm, numbers in arms.items():
        final = numbers["final_eval_loss"]
        cells = "".join(f" {_number(final['seeds'].get(str(s)), '.4f', '-')} |" for s in seeds)
        lines.append(f"| {arm} | {final['mean']:.4f} ± {_number(final['ci95'], '.4f')} |{cells}")
    lines += _reference_tables(report)
    lines += ["", "## Throughput", "",
              "Tokens/s over each run's logging windows, and the share of that time spent waiting on guidance "
              "(mean over seeds).", "", "| arm | tokens/s | guidance wait |", "|---|---|---|"]
    for arm, numbers in arms.items():
        wait = numbers["guidance_wait_share"]["mean"]
        lines.append(f"| {arm} | {_number(numbers['tokens_per_s']['mean'], '.0f')} "
                     f"| {'n/a' if wait is None else f'{100 * wait:.1f}%'} |")
    lines += _teacher_section(report)
    if plot:
        lines += ["", "## Eval curves", "", "Mean over seeds (faint: each seed); right: the paired difference with "
                  f"{REFERENCE}.", "", f"![eval curves]({plot})"]
    return "\n".join(lines) + "\n"


def _reference_tables(report: dict[str, Any]) -> list[str]:
    seeds, arms = report["seeds"], report["arms"]
    others = [arm for arm in arms if arm != REFERENCE and arms[arm].get("difference")]
    if REFERENCE not in arms:
        return ["", f"No {REFERENCE} arm: no paired differences or step ratios."]
    seed_heads = "".join(f" seed {s} |" for s in seeds)
    lines = ["", f"## Against {REFERENCE} (same seed)", "",
             f"Eval loss minus {REFERENCE}'s, run by run of the same seed: mean and 95% t-interval, then each seed's "
             "(negative: better).", "", f"| arm | mean difference | 95% interval |{seed_heads}",
             "|---" * (len(seeds) + 3) + "|"]
    for arm in others:
        diff = arms[arm]["difference"]
        half = diff["ci95"]
        low = None if half is None else f"[{diff['mean'] - half:+.4f}, {diff['mean'] + half:+.4f}]"
        cells = "".join(f" {_number(diff['seeds'].get(str(s)), '+.4f', '-')} |" for s in seeds)
        lines.append(f"| {arm} | {diff['mean']:+.4f} | {low or 'n/a'} |{cells}")
    lines += ["", f"## Steps to reach {REFERENCE}'s final eval loss", "",
              f"Steps an arm needs to reach the final eval loss of {REFERENCE}'s run of the same seed (interpolated "
              f"between evaluations) over {REFERENCE}'s steps; mean over the seeds that reach it.", "",
              f"| arm | step ratio | reached |{seed_heads}", "|---" * (len(seeds) + 3) + "|"]
    for arm in [REFERENCE, *others]:
        ratio = arms[arm]["step_ratio"]
        cells = "".join(f" {_number(ratio['seeds'].get(str(s)), '.2f', 'not reached')} |" for s in seeds)
        lines.append(f"| {arm} | {_number(ratio['mean'], '.2f', 'not reached')} | {ratio['reached']} of "
                     f"{ratio['n']} |{cells}")
    return lines


def _teacher_section(report: dict[str, Any]) -> list[str]:
    teacher, arms = report["teacher"], report["arms"]
    lines = ["", "## Teacher strength", "",
             "Eval loss in nats per byte of text (comparable across tokenizers)."]
    if teacher["nats_per_byte"] is None:
        lines += ["", "Teacher: not measured (the runs logged no teacher check)."]
    else:
        lines += ["", f"Teacher (the surrogate): {teacher['nats_per_byte']:.4f} nats/byte; the base at the start: "
                  f"{_number(teacher['base_nats_per_byte_at_start'], '.4f', 'not measured')}."]
        advantage = teacher["advantage_over_reference_pct"]
        lines.append(f"Advantage over the {REFERENCE} arm's final base: "
                     f"{_number(advantage, '+.1f', 'not measured')}{'%' if advantage is not None else ''} "
                     "(positive: the teacher needs fewer nats per byte).")
    lines += ["", "| arm | final eval nats/byte |", "|---|---|"]
    lines += [f"| {arm} | {_number(n['nats_per_byte']['mean'], '.4f', 'not measured')} |" for arm, n in arms.items()]
    return lines


def plot_curves(report: dict[str, Any], path: Path) -> None:
    """PNG of the eval curves (mean per arm, each seed faint) and of the paired differences with the reference."""
    try:
        import matplotlib
    except ModuleNotFoundError as err:
        raise ValueError("the A/B's plots need matplotlib: pip install 'sdce-training[ab]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = report["arms"]
    reference = arms.get(REFERENCE, {}).get("curve")
    figure, axes = plt.subplots(1, 2 if reference else 1, figsize=(12 if reference else 6.5, 4.2), squeeze=False)
    loss_axis = axes[0][0]
    for i, (arm, numbers) in enumerate(arms.items()):
        color, curve = f"C{i}", numbers["curve"]
        for points in curve["seeds"].values():
            loss_axis.plot(*zip(*points), color=color, alpha=0.25, linewidth=1)
        loss_axis.plot(curve["steps"], curve["mean"], color=color, linewidth=2, label=arm)
        if reference and arm != REFERENCE:
            _plot_difference(axes[0][1], curve, reference, color, arm)
    loss_axis.set(xlabel="optimizer step", ylabel="eval loss (nats/token)", title="eval loss")
    loss_axis.legend()
    if reference:
        axes[0][1].axhline(0.0, color="gray", linewidth=1)
        axes[0][1].set(xlabel="optimizer step", ylabel=f"eval loss - {REFERENCE}'s (same seed)",
                       title=f"against {REFERENCE}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_difference(axis: Any, curve: dict[str, Any], reference: dict[str, Any], color: str, arm: str) -> None:
    """The arm's eval loss minus the reference's, seed by seed (faint) and their mean, at the steps both evaluated."""
    differences = {}
    for seed, points in curve["seeds"].items():
        other = dict(map(tuple, reference["seeds"].get(seed, [])))
        shared = [(step, loss - other[step]) for step, loss in points if step in other]
        if shared:
            differences[seed] = dict(shared)
            axis.plot(*zip(*shared), color=color, alpha=0.25, linewidth=1)
    if differences:
        steps = sorted(set.intersection(*(set(d) for d in differences.values())))
        axis.plot(steps, [mean(d[s] for d in differences.values()) for s in steps], color=color, linewidth=2, label=arm)
        axis.legend()


def write_report(runs: list[Run], root: Path) -> dict[str, Any]:
    """report.json, eval_curves.png and report.md in ``root``; returns the numbers."""
    report = summarise(runs)
    config = runs[0].config
    steps = report["arms"][runs[0].arm]["curve"]["steps"]
    report["settings"] = [
        f"Base `{config.model.name_or_path}`, data `{config.data.train_file or config.data.dataset_name}`; each run "
        f"{steps[-1]} optimizer steps of {config.training.gradient_accumulation_steps} x "
        f"{config.training.per_device_train_batch_size} blocks of {config.data.max_seq_length} tokens per rank "
        f"(accumulation x batch), evaluated every {config.training.eval_steps} steps; runs in "
        f"`{root}/<arm>/seed<seed>`."]
    plot = "eval_curves.png"
    plot_curves(report, root / plot)
    (root / "report.json").write_text(json.dumps(report, indent=2))
    (root / "report.md").write_text(markdown(report, plot))
    return report


# -- the command line ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = config_cli.build_parser(
        SECTIONS,
        prog="python -m trainer.ab",
        usage="%(prog)s [--config FILE] [--arms A,B] [--seeds S,T] [--nproc_per_node N] [--demo] [train.py options]",
        description="Train the same base with each arm (loss type) and seed on the same data and budget, then write "
                    "OUTPUT_DIR/report.md and report.json. Every train.py option applies to every run.",
        epilog="examples:\n" + "\n".join("  " + line.strip() for line in __doc__.splitlines()[2:7]),
    )
    group = parser.add_argument_group("A/B")
    group.add_argument("--arms", default=DEFAULT_ARMS, help=f"Comma-separated, of {', '.join(ARMS)} "
                       f"(default {DEFAULT_ARMS}).")
    group.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"Comma-separated seeds, one run per arm each "
                       f"(default {DEFAULT_SEEDS}).")
    group.add_argument("--nproc_per_node", type=int, default=1,
                       help="Ranks per run: > 1 runs each under torchrun on this host (default 1: in this process).")
    group.add_argument("--demo", nargs="?", const="full", default=None, choices=("full", "quick"),
                       help="The offline demo's setup (python -m trainer.demo): its assets, trained surrogate and "
                            "run configs as the base config; 'quick' for its smoke-test profile.")
    group.add_argument("--demo_workdir", type=Path, default=Path.cwd() / ".cache" / "sdce-demo",
                       help="--demo: the demo's work directory (assets and surrogate, shared with trainer.demo).")
    group.add_argument("--debug", action="store_true", default=False,
                       help="Show the traceback of an error instead of its message alone.")
    return parser


def parse_arms(text: str) -> list[str]:
    arms = _distinct(text, "arms")
    for arm in arms:
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}: --arms takes {', '.join(ARMS)}")
    return arms


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(seed) for seed in _distinct(text, "seeds")]
    except ValueError as err:
        raise ValueError(f"--seeds takes distinct integers, comma-separated; got {text!r}") from err


def _distinct(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or len(set(items)) != len(items):
        raise ValueError(f"--{flag} must list distinct values, comma-separated; got {text!r}")
    return items


def demo_overrides(quick: bool, workdir: Path, user: Overrides) -> Overrides:
    """The demo's base-run config (its SDCE run's, before the A/B sets the loss) as overrides, with its assets made and
    its surrogate trained as ``trainer.demo`` does (and shares: both cache them in ``workdir``)."""
    from trainer import demo

    profile, spec = demo.demo_setup(quick)
    workdir = workdir.resolve()
    assets = demo.prepare_assets(workdir, spec)
    configs = demo.demo_configs(assets, profile, workdir, (user.get("training") or {}).get("device", "auto"))
    demo.trained_surrogate(configs["surrogate"])
    base = configs["sdce"].to_dict()
    base["training"]["output_dir"] = str(workdir / "ab")
    return base


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    overrides, rest = config_cli.parse_overrides(parser, argv)
    debug = rest["debug"]
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("start the A/B as one process and pass --nproc_per_node N: it runs torchrun for each run")
        arms, seeds = parse_arms(rest["arms"]), parse_seeds(rest["seeds"])
        if rest["nproc_per_node"] < 1:
            raise ValueError(f"--nproc_per_node must be at least 1, got {rest['nproc_per_node']}")
        if rest["demo"]:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            overrides = merge(demo_overrides(rest["demo"] == "quick", rest["demo_workdir"], overrides), overrides)
        root = Path((overrides.get("training") or {}).get("output_dir") or TrainingConfig.output_dir)
        runs = plan_runs(overrides, arms, seeds, root, rest["nproc_per_node"])
        root.mkdir(parents=True, exist_ok=True)
        run_all(runs, rest["nproc_per_node"], say=lambda line: print(line, flush=True))
        write_report(runs, root)
    except SurrogateUnavailable as err:
        print(f"trainer.ab: stopped: {err}", file=sys.stderr)
        return 1
    except (ValueError, ModuleNotFoundError) as err:
        if debug:
            raise
        print(f"trainer.ab: error: {err}", file=sys.stderr)
        return 2
    print(f"[ab] report: {root / 'report.md'} (numbers: {root / 'report.json'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
