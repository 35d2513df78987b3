"""trainer.demo asset preparation: corpus, the two tokenizers, the model directories, the run configs."""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from trainer import demo

SPEC = demo.AssetSpec(
    max_docs=300, base_vocab_size=400, surrogate_vocab_size=400, max_positions=64, base_width=16, base_layers=1,
    base_heads=2, surrogate_width=16, surrogate_ffn=32, surrogate_layers=1, surrogate_heads=2,
)
SAMPLE = "Return the number of items in a sequence.\n\n    Indented  twice — naïve café, 日本.\tTab"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoAssets:
    return demo.prepare_assets(tmp_path_factory.mktemp("demo"), SPEC)


def read_docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_corpus_is_deterministic_english_docstrings() -> None:
    docs = demo.stdlib_docstrings(max_docs=200)
    assert docs == demo.stdlib_docstrings(max_docs=200)
    assert len(docs) == 200 and len(set(docs)) == 200 and min(map(len, docs)) >= 32
    text = "\n".join(docs)
    letters = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text)
    assert letters / len(text) > 0.8
    words = re.findall(r"[a-z]+", text.lower())
    for common in ("the", "of", "to", "is", "return"):
        assert words.count(common) > 10, common


def test_corpus_skips_tests_and_idle() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = list(demo.stdlib_sources())
    assert paths == list(demo.stdlib_sources()) and len(paths) > 100
    assert root / "os.py" in paths
    for path in paths:
        assert not demo.SKIP_DIRS & set(path.relative_to(root).parts[:-1]), path


def test_split_documents_is_deterministic() -> None:
    docs = [f"doc {i}" for i in range(200)]
    train, valid = demo.split_documents(docs, 50)
    assert valid == ["doc 25", "doc 75", "doc 125", "doc 175"]
    assert len(train) == 196 and not set(train) & set(valid)


def test_corpus_files_hold_multiline_documents(assets: demo.DemoAssets) -> None:
    train, valid = read_docs(assets.train_file), read_docs(assets.valid_file)
    assert len(train) + len(valid) == SPEC.max_docs and len(valid) == SPEC.max_docs // SPEC.valid_every
    assert any("\n" in doc for doc in train)
    assert train + valid and not set(train) & set(valid)


def test_second_prepare_reuses_the_assets(assets: demo.DemoAssets, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("assets prepared again")

    monkeypatch.setattr(demo, "stdlib_docstrings", must_not_run)
    assert demo.prepare_assets(assets.root.parent, SPEC) == assets
    other = demo.AssetSpec(**{**SPEC.__dict__, "base_vocab_size": 401})
    assert other.key() != SPEC.key()


def test_model_dirs_load_offline(assets: demo.DemoAssets) -> None:
    base_config = AutoConfig.from_pretrained(assets.base_dir)
    surrogate_config = AutoConfig.from_pretrained(assets.surrogate_init_dir)
    assert (base_config.model_type, surrogate_config.model_type) == ("gpt2", "llama")
    assert base_config.n_embd == SPEC.base_width and surrogate_config.hidden_size == SPEC.surrogate_width
    for path, config in ((assets.base_dir, base_config), (assets.surrogate_init_dir, surrogate_config)):
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert len(tokenizer) == config.vocab_size == 400
        assert tokenizer.eos_token_id == config.eos_token_id is not None
        assert config.max_position_embeddings == SPEC.max_positions


def test_tokenizers_are_of_different_families(assets: demo.DemoAssets) -> None:
    base = AutoTokenizer.from_pretrained(assets.base_dir)
    surrogate = AutoTokenizer.from_pretrained(assets.surrogate_init_dir)
    base_json = json.loads(base.backend_tokenizer.to_str())
    surrogate_json = json.loads(surrogate.backend_tokenizer.to_str())
    assert base_json["pre_tokenizer"]["type"] == "ByteLevel"
    assert surrogate_json["pre_tokenizer"]["type"] == "Metaspace" and surrogate_json["model"]["byte_fallback"]
    assert (base.eos_token, base.bos_token, base.pad_token) == ("<|endoftext|>",) * 3
    assert (surrogate.unk_token, surrogate.bos_token, surrogate.eos_token) == ("<unk>", "<s>", "</s>")
    assert surrogate.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]) == [0, 1, 2, 3, 258]
    base_pieces = base.convert_ids_to_tokens(base(SAMPLE, add_special_tokens=False)["input_ids"])
    surrogate_pieces = surrogate.convert_ids_to_tokens(surrogate(SAMPLE, add_special_tokens=False)["input_ids"])
    assert any(p.startswith("Ġ") for p in base_pieces) and not any(p.startswith("▁") for p in base_pieces)
    assert any(p.startswith("▁") for p in surrogate_pieces) and "<0xE6>" in surrogate_pieces  # 日 via byte fallback
    for tokenizer in (base, surrogate):
        assert tokenizer.decode(tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]) == SAMPLE


def test_vocabularies_align(assets: demo.DemoAssets) -> None:
    vocab = pytest.importorskip("trainer.alignment")
    base = AutoTokenizer.from_pretrained(assets.base_dir)
    surrogate = AutoTokenizer.from_pretrained(assets.surrogate_init_dir)
    sample = "\n".join(read_docs(assets.valid_file))
    alignment = vocab.align_vocabularies(base, surrogate, sample_text=sample)
    assert alignment.coverage > 0.5


def test_run_configs(assets: demo.DemoAssets, tmp_path: Path) -> None:
    configs = demo.demo_configs(assets, demo.QUICK, tmp_path, device="cpu")
    assert list(configs) == ["surrogate", "sdce", "standard"]
    surrogate, sdce, standard = configs.values()
    assert surrogate.training.loss_type == "standard" and surrogate.model.name_or_path == str(assets.surrogate_init_dir)
    assert sdce.training.loss_type == "surrogate" and sdce.surrogate.name_or_path == surrogate.training.output_dir
    assert standard.training.loss_type == "standard" and standard.surrogate.name_or_path is None
    for config in (sdce, standard):
        assert config.model.name_or_path == str(assets.base_dir) and config.model.init_from_scratch
        assert config.training.max_steps == demo.QUICK.steps and config.training.device == "cpu"
    assert sdce.data == standard.data and sdce.data.train_file == str(assets.train_file)
    assert sdce.data.eval_file == str(assets.valid_file) and sdce.data.max_seq_length == demo.QUICK.seq_len
    assert {sdce.training.seed, standard.training.seed, surrogate.training.seed} == {demo.SEED}
    assert (sdce.surrogate.loss_weight_initial, sdce.surrogate.loss_weight_final) == (1.0, 0.0)


def test_results_table() -> None:
    row = {"loss_type": "standard", "eval_loss": 3.5, "perplexity": 33.12, "steps": 10, "wall_seconds": 12.3}
    sdce = {**row, "loss_type": "surrogate", "eval_loss": 3.25}
    table = demo.results_table({"surrogate": {**row, "cached": True}, "sdce": sdce, "standard": row})
    assert "| base + SDCE | surrogate | 3.2500 | 33.12 | 10 | 12 s |" in table
    assert "12 s (cached)" in table and "SDCE - standard eval loss: -0.2500 (SDCE better)" in table
    assert "n/a" in demo.results_table({"sdce": {**row, "eval_loss": None, "perplexity": None}})


def test_cli_defaults_and_quick() -> None:
    args = demo.build_parser().parse_args(["--quick", "--steps", "3"])
    assert args.quick and args.steps == 3 and args.surrogate_steps is None
    assert args.workdir == Path.cwd() / ".cache" / "sdce-demo"
