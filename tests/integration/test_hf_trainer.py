"""SDCETrainer (transformers.Trainer) against train.py: the same run, step by step."""

from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from surrogate_server.process import ServerProcess
from trainer.data import build_lm_datasets
from trainer.hf import SDCEConfig, SDCETrainer
from trainer.losses import LOSS_TYPES
from trainer.train import train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS, BATCH, ACCUMULATION = 6, 2, 2


def hf_run(config, surrogate_dir, output_dir, resume=None, **overrides):
    """SDCETrainer on train.py's blocks, in the order train.py's sampler draws them in its first epoch."""
    training = config.training
    tokenizer = AutoTokenizer.from_pretrained(config.model.name_or_path)
    train_set, _ = build_lm_datasets(config.data, tokenizer, seed=training.seed)
    order = list(DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=training.seed, drop_last=True))
    assert len(order) >= STEPS * BATCH * ACCUMULATION, "the comparison must stay inside train.py's first epoch"
    blocks = train_set.select(order).rename_column("labels", "shift_labels")  # train.py's labels are shifted already
    args = SDCEConfig(
        output_dir=str(output_dir), loss_type=training.loss_type, surrogate_model=surrogate_dir and str(surrogate_dir),
        surrogate_k=config.surrogate.k, surrogate_probability_threshold=config.surrogate.probability_threshold,
        max_steps=STEPS, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
        learning_rate=training.learning_rate, lr_scheduler_type="cosine", warmup_steps=training.warmup_steps,
        weight_decay=training.weight_decay, optim="adamw_torch", max_grad_norm=training.max_grad_norm,
        train_sampling_strategy="sequential", logging_steps=1, report_to="none",
        use_cpu=True, seed=training.seed, disable_tqdm=True, **{"save_strategy": "no", **overrides},
    )
    model = AutoModelForCausalLM.from_pretrained(config.model.name_or_path)
    trainer = SDCETrainer(model=model, args=args, train_dataset=blocks, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer, [h for h in trainer.state.log_history if "ce" in h]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sdce_trainer_reproduces_train_py_step_by_step(make_config, surrogate_dir, tmp_path, loss_type):
    config = make_config({"training": {"loss_type": loss_type, "max_steps": STEPS, "per_device_train_batch_size": BATCH,
                                       "gradient_accumulation_steps": ACCUMULATION}}, tmp_path / "train_py")
    reference = train(config).history
    _, logs = hf_run(config, surrogate_dir, tmp_path / "hf")
    assert [h["step"] for h in logs] == [h["step"] for h in reference] == list(range(1, STEPS + 1))
    for got, want in zip(logs, reference):
        assert ("lambda" in got) == ("lambda" in want) == (loss_type != "standard")  # no lambda without guidance
        for key in ("loss", "ce", "surrogate_term", "lambda", "grad_norm", "guided_share"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (loss_type, got["step"], key)
    if loss_type != "standard":
        assert all(h["guided_share"] > 0 for h in logs) and any(h["surrogate_term"] > 0 for h in logs)


def test_logits_path_and_eval(make_config, surrogate_dir, tmp_path):
    """Without the fused loss the same steps; evaluation is plain CE over the eval blocks' labels."""
    config = make_config({"training": {"max_steps": STEPS, "per_device_train_batch_size": BATCH,
                                       "gradient_accumulation_steps": ACCUMULATION}}, tmp_path / "train_py")
    fused_trainer, fused = hf_run(config, surrogate_dir, tmp_path / "fused")
    assert fused_trainer.hidden is not None  # GPT-2's head: the fused path was taken
    trainer, logits = hf_run(config, surrogate_dir, tmp_path / "logits", fused_loss=False)
    assert trainer.hidden is None
    for a, b in zip(fused, logits, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    tokenizer = trainer.processing_class
    _, eval_set = build_lm_datasets(config.data, tokenizer, seed=config.training.seed)
    metrics = trainer.evaluate(eval_set.rename_column("labels", "shift_labels"))
    assert 0 < metrics["eval_loss"] < 20


def test_remote_surrogate_trains_like_the_in_process_one(make_config, surrogate_dir, tmp_path):
    """surrogate_endpoint: a real server process on loopback; guidance prefetched two micro-batches ahead."""
    config = make_config({"training": {"max_steps": STEPS, "per_device_train_batch_size": BATCH,
                                       "gradient_accumulation_steps": ACCUMULATION}}, tmp_path / "train_py")
    server = ServerProcess(surrogate_dir, "--device", "cpu", "--dtype", "float32", cwd=ROOT,
                           env={"OMP_NUM_THREADS": "1"}).start()
    try:
        _, remote = hf_run(config, None, tmp_path / "remote", surrogate_endpoint=server.grpc,
                                 surrogate_prefetch_depth=2)
    finally:
        server.kill()
    _, local = hf_run(config, surrogate_dir, tmp_path / "local")
    for a, b in zip(remote, local, strict=True):
        for key in ("loss", "ce", "surrogate_term", "guided_share"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    # Prefetched: a window may log requests made for the next; over the run, one per micro-batch (and none failed).
    assert sum(h["guidance_requests"] for h in remote) >= STEPS * ACCUMULATION
    assert all(h["unguided_batches"] == 0 and h["guidance_failures"] == 0 for h in remote)


def test_resume_logs_like_the_uninterrupted_run(make_config, surrogate_dir, tmp_path):
    config = make_config({"training": {"max_steps": STEPS, "per_device_train_batch_size": BATCH,
                                       "gradient_accumulation_steps": ACCUMULATION}}, tmp_path / "train_py")
    _, full = hf_run(config, surrogate_dir, tmp_path / "full", save_strategy="steps", save_steps=3)
    _, history = hf_run(config, surrogate_dir, tmp_path / "full", resume=tmp_path / "full" / "checkpoint-3")
    resumed = [h for h in history if h["step"] > 3]  # the history restored from the checkpoint comes first
    assert [h["step"] for h in resumed] == [4, 5, 6]
    for a, b in zip(resumed, full[3:], strict=True):
        for key in ("loss", "ce", "surrogate_term", "lambda"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


def test_eval_loss_is_the_token_mean_for_a_llama_base(make_config, surrogate_dir, tmp_path):
    """A Llama base (HF's count would shift our labels again): eval_loss is the mean CE over the labelled tokens."""
    config = make_config({"model": {"name_or_path": str(surrogate_dir)}, "training": {"loss_type": "standard"}})
    tokenizer = AutoTokenizer.from_pretrained(surrogate_dir)
    _, eval_set = build_lm_datasets(config.data, tokenizer, seed=0)
    model = AutoModelForCausalLM.from_pretrained(surrogate_dir)
    args = SDCEConfig(output_dir=str(tmp_path), loss_type="standard", report_to="none", use_cpu=True,
                      per_device_eval_batch_size=len(eval_set))
    trainer = SDCETrainer(model=model, args=args, processing_class=tokenizer, train_dataset=eval_set)
    got = trainer.evaluate(eval_set.rename_column("labels", "shift_labels"))["eval_loss"]
    rows = eval_set[:]
    with torch.no_grad():
        logits = model(input_ids=rows["input_ids"]).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows["labels"].flatten(), ignore_index=-100)
    assert got == pytest.approx(want.item(), rel=1e-5)


def test_config_reads_train_py_flag_names(surrogate_dir, tmp_path):
    parser = HfArgumentParser(SDCEConfig)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--surrogate_model", str(surrogate_dir), "--loss_type", "kl",
        "--surrogate_k", "12", "--surrogate_alignment", "tokens", "--no_fused_loss", "--report_to", "none",
    ])
    cfg = args.surrogate_config()
    assert (args.loss_type, args.fused_loss, cfg.k, cfg.alignment) == ("kl", False, 12, "tokens")
    with pytest.raises(ValueError, match="surrogate.k"):
        SDCEConfig(output_dir=str(tmp_path), surrogate_k=0, report_to="none")
    with pytest.raises(ValueError, match="needs a surrogate"):
        SDCETrainer(model=None, args=SDCEConfig(output_dir=str(tmp_path), report_to="none"),
                    processing_class=AutoTokenizer.from_pretrained(surrogate_dir), train_dataset=[{"input_ids": [1]}])
