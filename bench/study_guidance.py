"""The guidance study of docs/method.md on a second text: teachers of two strengths, and the control.

The demo's machinery (``trainer.demo``: a byte-level BPE GPT-2 base, a SentencePiece Llama surrogate,
both tokenizers trained on the text, the demo's model sizes and learning rate) on another corpus:
tinyshakespeare (``../shared/data/tinyshakespeare/input.txt``, or ``--text``), cut into documents of
12 speeches, every 50th held out. Two surrogates trained first with plain CE, a weak one
(``--weak_steps``) and a strong one (``--strong_steps``); then ``trainer.ab`` with each teacher
(standard, surrogate, kl; the kl control with the strong one's run: it uses no surrogate), 3 seeds.

    python bench/study_guidance.py                   # ~45 min on 2 cores
    python -m trainer.ab --demo --arms standard,surrogate,kl,surrogate_control,kl_control \\
        --output_dir .cache/study/demo               # the embedded default's half of the study
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import demo  # noqa: E402

SPEECHES_PER_DOCUMENT = 12


def documents(path: Path) -> list[str]:
    """The text's speeches (blank-line separated), grouped SPEECHES_PER_DOCUMENT to a document."""
    speeches = [part.strip() for part in path.read_text().split("\n\n") if part.strip()]
    return ["\n\n".join(speeches[i:i + SPEECHES_PER_DOCUMENT]) for i in range(0, len(speeches), SPEECHES_PER_DOCUMENT)]


def prepare(text: Path, workdir: Path, spec: demo.AssetSpec) -> demo.DemoAssets:
    """The demo's asset layout for ``text``: train/valid jsonl, the two tokenizers and model configs."""
    assets = demo.DemoAssets(workdir / "assets")
    if assets.manifest.is_file():
        return assets
    assets.root.mkdir(parents=True, exist_ok=True)
    train_docs, valid_docs = demo.split_documents(documents(text), spec.valid_every)
    demo.write_jsonl(assets.train_file, train_docs)
    demo.write_jsonl(assets.valid_file, valid_docs)
    base_tok = demo.train_byte_level_bpe(train_docs, spec.base_vocab_size, spec.max_positions)
    base_tok.save_pretrained(assets.base_dir)
    demo.base_model_config(spec, base_tok).save_pretrained(assets.base_dir)
    surrogate_tok = demo.train_sentencepiece_bpe(train_docs, spec.surrogate_vocab_size, spec.max_positions)
    surrogate_tok.save_pretrained(assets.surrogate_init_dir)
    demo.surrogate_model_config(spec, surrogate_tok).save_pretrained(assets.surrogate_init_dir)
    assets.manifest.write_text(json.dumps({"text": str(text), "documents": [len(train_docs), len(valid_docs)]}))
    return assets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "study" / "shakespeare")
    parser.add_argument("--steps", type=int, default=300, help="Steps of each base run.")
    parser.add_argument("--weak_steps", type=int, default=150)
    parser.add_argument("--strong_steps", type=int, default=1500)
    parser.add_argument("--seeds", default="42,43,44")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = args.workdir.resolve()
    profile, spec = demo.demo_setup(steps=args.steps)
    assets = prepare(args.text, workdir, spec)
    for strength, steps in (("weak", args.weak_steps), ("strong", args.strong_steps)):
        teacher = workdir / f"surrogate-{strength}-{steps}"
        demo.trained_surrogate(demo.run_config(assets, profile, model_dir=assets.surrogate_init_dir,
                                               output_dir=teacher, steps=steps, loss_type="standard"))
        base = demo.run_config(assets, profile, model_dir=assets.base_dir, output_dir=workdir / f"ab-{strength}",
                               steps=args.steps, loss_type="surrogate", surrogate_dir=teacher)
        base.save(workdir / f"{strength}.yaml")
        arms = "standard,surrogate,kl" + (",kl_control" if strength == "strong" else "")
        subprocess.run([sys.executable, "-m", "trainer.ab", "--config", str(workdir / f"{strength}.yaml"),
                        "--arms", arms, "--seeds", args.seeds, "--no_progress_bar"], cwd=ROOT, check=True)
        print((workdir / f"ab-{strength}" / "report.md").read_text())


if __name__ == "__main__":
    main()
