"""The compose CPU profile's assets: the offline demo's corpus, tokenizers and models at fixed paths.

    python /opt/sdce/prepare_demo.py /data/demo     # the `demo-assets` service of deploy/docker-compose.yml

Writes, under the directory given:

    base/         a GPT-2 config and byte-level BPE tokenizer (train it with --init_from_scratch)
    surrogate/    a Llama with a SentencePiece-style tokenizer, trained briefly on the corpus,
                  weights included: what the server loads (--model)
    train.jsonl   the corpus (docstrings of the Python standard library), valid.jsonl its eval split

Everything comes from trainer.demo (nothing is downloaded); a second run reuses what is there.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainer.demo import AssetSpec, RunProfile, prepare_assets, run_config  # noqa: E402

SPEC = AssetSpec(max_docs=2000, base_vocab_size=1024, surrogate_vocab_size=1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--surrogate_steps", type=int, default=30, help="Steps of plain CE for the surrogate.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = args.workdir.resolve()
    assets = prepare_assets(root / "cache", SPEC)
    for name, source in (("base", assets.base_dir), ("train.jsonl", assets.train_file),
                         ("valid.jsonl", assets.valid_file)):
        link = root / name
        if not link.exists():
            link.symlink_to(source.relative_to(root))
    surrogate = root / "surrogate"
    if not (surrogate / "config.json").is_file():
        from trainer.train import train

        staging = root / ".surrogate.tmp"
        profile = RunProfile(steps=args.surrogate_steps, surrogate_steps=args.surrogate_steps, seq_len=64, batch_size=8)
        train(run_config(assets, profile, model_dir=assets.surrogate_init_dir, output_dir=staging,
                         steps=args.surrogate_steps, loss_type="standard", device="cpu"))
        for leftover in staging.glob("checkpoint-*"):
            shutil.rmtree(leftover)
        staging.rename(surrogate)
    print(f"demo assets ready in {root}: base/ surrogate/ train.jsonl valid.jsonl", flush=True)


if __name__ == "__main__":
    main()
