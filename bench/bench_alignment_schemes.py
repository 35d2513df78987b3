"""What the surrogate reads: byte-aligned input (its own tokenization) against id-by-id mapping.

Both schemes in one run, on the offline demo's setup (``trainer.demo``: stdlib-docstring
corpus, a byte-level BPE base and a SentencePiece surrogate trained first on its own
tokenization):

1. how well the surrogate predicts the base's next token under each scheme: the mean
   log-prob it gives b2s[y_t] (the true next base token, mapped) at the position that
   guides t, over the eval blocks, on the positions both schemes can guide, and the
   share of labelled positions each scheme guides at all;
2. the demo's A/B: eval loss of the base trained with SDCE under each scheme, and with
   standard CE, same data, budget and seed.

    python bench/bench_alignment_schemes.py            # the demo's full budget (~10 min on 2 cores)
    python bench/bench_alignment_schemes.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from surrogate_server.engine import SurrogateEngine  # noqa: E402
from trainer import demo  # noqa: E402
from trainer.alignment import ByteAligner, align_vocabularies  # noqa: E402
from trainer.data import build_lm_datasets  # noqa: E402
from trainer.guidance import placeholder_id, surrogate_inputs  # noqa: E402
from trainer.losses import IGNORE_INDEX  # noqa: E402


@torch.no_grad()
def next_token_logprobs(config, surrogate_dir: Path, length_ratio: float) -> dict[str, dict[str, float]]:
    """Mean log p_s(b2s[y_t]) at the guiding position, per scheme, on the eval blocks."""
    base_tokenizer = AutoTokenizer.from_pretrained(config.model.name_or_path)
    engine = SurrogateEngine.from_pretrained(str(surrogate_dir), device="cpu", dtype="float32")
    alignment = align_vocabularies(base_tokenizer, engine.vocabulary())
    _, eval_set = build_lm_datasets(config.data, base_tokenizer, seed=config.training.seed)
    rows = eval_set[: len(eval_set)]
    ids, labels = torch.as_tensor(rows["input_ids"]).long(), torch.as_tensor(rows["labels"]).long()
    length = 8 * math.ceil(length_ratio * ids.shape[1] / 8)
    aligner = ByteAligner(base_tokenizer, engine.tokenizer(), max_surrogate_tokens=length)
    target = alignment.base_to_surrogate[labels.clamp(min=0)]  # [N, T]
    usable = (labels != IGNORE_INDEX) & (target >= 0)
    per_scheme = {}
    for scheme in ("tokens", "bytes"):
        if scheme == "tokens":
            s_ids, s_mask = surrogate_inputs(ids, alignment, placeholder_id(engine.vocabulary()))
            where = torch.arange(ids.shape[1]).expand_as(ids)
            guided = usable & (s_mask == 1)
        else:
            s_ids, s_mask, where = aligner(ids)
            guided = usable & (where >= 0)
        logits = engine.model(input_ids=s_ids, attention_mask=s_mask).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)  # [N, S, V_s]
        at_t = logprobs.gather(1, where.clamp(min=0).unsqueeze(-1).expand(-1, -1, logprobs.shape[-1]))
        logprob = at_t.gather(-1, target.clamp(min=0).unsqueeze(-1))[..., 0]
        per_scheme[scheme] = {"guided": guided, "logprob": logprob}
    both = per_scheme["tokens"]["guided"] & per_scheme["bytes"]["guided"]
    labelled = (labels != IGNORE_INDEX).sum().item()
    return {
        scheme: {
            "guided_share": row["guided"].sum().item() / labelled,
            "mean_logprob_common": row["logprob"][both].mean().item(),
            "mean_logprob_own": row["logprob"][row["guided"]].mean().item(),
        }
        for scheme, row in per_scheme.items()
    } | {"common": {"share": both.sum().item() / labelled}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", type=Path, default=Path.cwd() / ".cache" / "sdce-demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    profile, spec = (demo.QUICK, demo.QUICK_SPEC) if args.quick else (demo.FULL, demo.AssetSpec())
    workdir = args.workdir.resolve()
    assets = demo.prepare_assets(workdir, spec)
    configs = demo.demo_configs(assets, profile, workdir)
    demo.trained_surrogate(configs["surrogate"])
    surrogate_dir = Path(configs["surrogate"].training.output_dir)
    ratio = configs["sdce"].surrogate.length_ratio
    predicted = next_token_logprobs(configs["sdce"], surrogate_dir, ratio)

    runs = {"standard": configs["standard"]}
    sdce = configs["sdce"]
    for scheme in ("tokens", "bytes"):
        runs[f"sdce ({scheme})"] = dataclasses.replace(
            sdce, surrogate=dataclasses.replace(sdce.surrogate, alignment=scheme),
            training=dataclasses.replace(sdce.training, output_dir=str(workdir / "runs" / f"sdce-{scheme}")))
    results = {name: demo._run(name, config) for name, config in runs.items()}

    print(f"\n## The surrogate's next-token log-prob (demo eval blocks, S = {ratio} x T)\n")
    print("| scheme | labelled positions guided | mean log p_s(true next token), common positions | own positions |")
    print("|---|---|---|---|")
    for scheme in ("tokens", "bytes"):
        row = predicted[scheme]
        print(f"| {scheme} | {100 * row['guided_share']:.1f}% | {row['mean_logprob_common']:.4f} "
              f"| {row['mean_logprob_own']:.4f} |")
    print(f"\ncommon positions: {100 * predicted['common']['share']:.1f}% of labelled positions\n")
    print(f"## The demo's A/B ({profile.steps} steps x {profile.batch_size} x {profile.seq_len} tokens, seed {demo.SEED})\n")
    print("| run | eval loss | vs standard | wall time |")
    print("|---|---|---|---|")
    standard = results["standard"]["eval_loss"]
    for name, row in results.items():
        print(f"| {name} | {row['eval_loss']:.4f} | {row['eval_loss'] - standard:+.4f} | {row['wall_seconds']:.0f} s |")


if __name__ == "__main__":
    main()
