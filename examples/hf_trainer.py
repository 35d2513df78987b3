"""SDCE in a Hugging Face Trainer script: causal-LM training as HF's run_clm.py does it, plus three lines.

Offline, on the demo's assets (the standard-library docstring corpus, a GPT-2-shaped base
trained from scratch, and the Llama surrogate the demo trains first; made on the first run
and cached in .cache/sdce-demo):

    python examples/hf_trainer.py --output_dir outputs/hf-sdce --max_steps 400 --learning_rate 2e-3

On your own models and text (hub names work where there is a network):

    python examples/hf_trainer.py --base_model gpt2 --surrogate_model Qwen/Qwen3-0.6B \
        --train_file data/train.jsonl --block_size 1024 --output_dir outputs/gpt2-sdce --bf16

Every TrainingArguments flag works, and SDCE's under train.py's names (--loss_type,
--surrogate_endpoint, --surrogate_k, ...): python examples/hf_trainer.py --help
"""

from __future__ import annotations

import itertools
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer import demo  # noqa: E402
from trainer.hf import SDCEConfig, SDCETrainer  # noqa: E402  (1 of 3: the import)


@dataclass
class ScriptArguments:
    base_model: str | None = field(default=None, metadata={"help": "Base model name or directory (default: the demo's)."})
    init_from_scratch: bool = field(default=False, metadata={"help": "Train the base from its config, not its weights "
                                                                     "(the demo's base always is)."})
    train_file: str | None = field(default=None, metadata={"help": "Training text: .txt, .json or .jsonl (default: the demo's)."})
    eval_file: str | None = field(default=None, metadata={"help": "Evaluation text, same formats."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text (json/jsonl)."})
    block_size: int = field(default=128, metadata={"help": "Tokens per packed training block."})
    demo_workdir: str = field(default=".cache/sdce-demo", metadata={"help": "Where the demo's assets are made and kept."})
    quick: bool = field(default=False, metadata={"help": "The demo's tiny assets and surrogate: a smoke run."})


def demo_defaults(script: ScriptArguments, args: SDCEConfig) -> None:
    """Fill what was not given from the demo: its base, its corpus and its surrogate (trained here if need be)."""
    profile, spec = (demo.QUICK, demo.QUICK_SPEC) if script.quick else (demo.FULL, demo.AssetSpec())
    workdir = Path(script.demo_workdir).resolve()
    assets = demo.prepare_assets(workdir, spec)
    if script.base_model is None:
        script.base_model, script.init_from_scratch = str(assets.base_dir), True
    script.train_file = script.train_file or str(assets.train_file)
    script.eval_file = script.eval_file or str(assets.valid_file)
    if args.loss_type != "standard" and not (args.surrogate_model or args.surrogate_endpoint):
        surrogate = demo.demo_configs(assets, profile, workdir, "cpu" if args.use_cpu else "auto")["surrogate"]
        demo.trained_surrogate(surrogate)
        args.surrogate_model = surrogate.training.output_dir


def packed_blocks(script: ScriptArguments, tokenizer):
    """The text, tokenized (EOS after each document) and cut into blocks: HF's run_clm recipe (labels = input_ids)."""
    files = {"train": script.train_file, **({"validation": script.eval_file} if script.eval_file else {})}
    kind = "text" if script.train_file.endswith(".txt") else "json"
    raw = load_dataset(kind, data_files=files)

    def tokenize(batch):
        return {"input_ids": [ids + [tokenizer.eos_token_id] for ids in tokenizer(batch[script.text_column])["input_ids"]]}

    def group(batch):
        stream = list(itertools.chain.from_iterable(batch["input_ids"]))
        size = len(stream) // script.block_size * script.block_size
        blocks = [stream[i : i + script.block_size] for i in range(0, size, script.block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)
    return tokenized.map(group, batched=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    script, args = HfArgumentParser((ScriptArguments, SDCEConfig)).parse_args_into_dataclasses()
    if not (script.base_model and script.train_file):
        demo_defaults(script, args)
    set_seed(args.seed)  # before the model: a model made from its config draws its initial weights
    tokenizer = AutoTokenizer.from_pretrained(script.base_model)
    if script.init_from_scratch:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(script.base_model))
    else:
        model = AutoModelForCausalLM.from_pretrained(script.base_model)
    blocks = packed_blocks(script, tokenizer)
    trainer = SDCETrainer(  # (2 of 3: the trainer; 3 of 3: SDCEConfig above, for the arguments)
        model=model, args=args, train_dataset=blocks["train"], eval_dataset=blocks.get("validation"),
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)  # HF leaves this flag to the script
    metrics = trainer.evaluate() if "validation" in blocks else {}
    trainer.save_model()
    trainer.save_state()  # trainer_state.json: the log history
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
