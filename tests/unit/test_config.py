"""Config tree and command line: precedence, the original README's commands and YAML, errors."""

import importlib.util
import re
import textwrap

import pytest

from trainer.cli import parse_args
from trainer.config import TrainConfig, build_config

ORIGINAL_YAML = textwrap.dedent(
    """\
    # config.yaml
    model:
      name_or_path: gpt2
      dtype: bfloat16
      gradient_checkpointing: true

    surrogate:
      name_or_path: Qwen/Qwen3-0.6B
      dtype: bfloat16
      k: 30
      probability_threshold: 0.02
      loss_weight_initial: 1.0
      loss_weight_final: 0.0

    data:
      dataset_name: wikitext
      dataset_config: wikitext-2-raw-v1
      max_seq_length: 1024

    training:
      device: auto
      num_epochs: 3
      per_device_train_batch_size: 4
      gradient_accumulation_steps: 4
      learning_rate: 1e-4
      mixed_precision: bf16
      loss_type: surrogate  # surrogate | kl | standard
      output_dir: ./outputs
      wandb_project: sdce-training
    """
)


@pytest.fixture
def original_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(ORIGINAL_YAML)
    return path


def test_original_yaml_is_read_as_written(original_yaml):
    cfg = parse_args(["--config", str(original_yaml)])
    assert cfg.model.name_or_path == "gpt2" and cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
    assert cfg.surrogate.name_or_path == "Qwen/Qwen3-0.6B" and cfg.surrogate.k == 30
    assert cfg.surrogate.probability_threshold == 0.02
    assert cfg.data.dataset_config == "wikitext-2-raw-v1" and cfg.data.max_seq_length == 1024
    # PyYAML reads 1e-4 as a string; the config must still get a float.
    assert cfg.training.learning_rate == pytest.approx(1e-4) and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.gradient_accumulation_steps == 4 and cfg.training.mixed_precision == "bf16"
    assert cfg.training.wandb_project == "sdce-training"


def test_flags_override_yaml_which_overrides_defaults(original_yaml):
    cfg = parse_args(["--config", str(original_yaml), "--surrogate_k", "8", "--learning_rate", "3e-4"])
    assert cfg.surrogate.k == 8  # flag beats YAML (30)
    assert cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.training.gradient_accumulation_steps == 4  # YAML beats default (1)
    assert cfg.training.seed == 42  # default


@pytest.mark.parametrize(
    "argv",
    [
        "--base_model gpt2 --surrogate_model Qwen/Qwen3-0.6B --dataset wikitext --dataset_config wikitext-2-raw-v1 "
        "--batch_size 4 --learning_rate 1e-4 --num_epochs 3",
        "--device tpu --tpu_cores 8 --base_model gpt2 --surrogate_model Qwen/Qwen3-0.6B --mixed_precision bf16 "
        "--dataset wikitext --dataset_config wikitext-2-raw-v1",
        "--device tpu --tpu_cores 8 --tpu_num_hosts 4 --base_model gpt2 --surrogate_model Qwen/Qwen3-0.6B "
        "--mixed_precision bf16 --dataset wikitext --dataset_config wikitext-2-raw-v1",
        "--standard_training --base_model gpt2 --dataset wikitext",
    ],
)
def test_original_readme_commands_parse(argv):
    cfg = parse_args(argv.split())
    assert cfg.model.name_or_path == "gpt2" and cfg.data.dataset_name == "wikitext"


def test_every_documented_flag(tmp_path):
    cfg = parse_args(
        "--base_model b --surrogate_model s --train_file t.txt --loss_type kl --surrogate_k 5 "
        "--probability_threshold 0.1 --surrogate_loss_weight_initial 2 --surrogate_loss_weight_final 0.5 "
        "--mixed_precision fp16 --gradient_checkpointing --init_from_scratch --device cuda --tpu_cores 4 "
        "--tpu_num_hosts 2 --output_dir out --wandb_project p --resume_from_checkpoint latest".split()
    )
    assert (cfg.training.loss_type, cfg.surrogate.k, cfg.surrogate.probability_threshold) == ("kl", 5, 0.1)
    assert (cfg.surrogate.loss_weight_initial, cfg.surrogate.loss_weight_final) == (2.0, 0.5)
    assert cfg.model.gradient_checkpointing and cfg.model.init_from_scratch
    assert (cfg.training.device, cfg.training.tpu_cores, cfg.training.tpu_num_hosts) == ("cuda", 4, 2)
    assert (cfg.training.output_dir, cfg.training.wandb_project) == ("out", "p")
    assert cfg.training.resume_from_checkpoint == "latest"


def test_standard_training_needs_no_surrogate():
    cfg = parse_args(["--standard_training", "--dataset", "d"])
    assert cfg.training.loss_type == "standard" and cfg.surrogate.name_or_path is None


def test_dotted_flags_and_boolean_negation():
    cfg = parse_args("--standard_training --dataset d --model.gradient_checkpointing --no_progress_bar".split())
    assert cfg.model.gradient_checkpointing and not cfg.training.progress_bar


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_unknown_flag_names_the_closest(capsys):
    err = _error(capsys, ["--standard_training", "--dataset", "d", "--surogate_k", "3"])
    assert "--surogate_k" in err and "--surrogate_k" in err


def test_unknown_yaml_key_names_the_closest(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("surrogate:\n  probablity_threshold: 0.1\n")
    err = _error(capsys, ["--config", str(path), "--standard_training", "--dataset", "d"])
    assert "probablity_threshold" in err and "probability_threshold" in err


def test_unknown_yaml_section(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("trainig:\n  seed: 1\n")
    assert "'training'" in _error(capsys, ["--config", str(path), "--standard_training", "--dataset", "d"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"training": {"device": "tpu", "mixed_precision": "fp16", "loss_type": "standard"}}, "--mixed_precision bf16"),
        ({"surrogate": {"k": 0}}, "at least 1"),
        ({"surrogate": {"probability_threshold": 1.0}}, "[0, 1)"),
        ({"surrogate": {"probability_threshold": -0.1}}, "[0, 1)"),
        ({"training": {"loss_type": "surrogate"}}, "--surrogate_model"),
        ({"training": {"loss_type": "kl"}}, "--surrogate_endpoint"),
        ({"training": {"loss_type": "mse"}}, "surrogate, kl, standard"),
        ({"training": {"learning_rate": "fast", "loss_type": "standard"}}, "cannot read 'fast' as float"),
    ],
)
def test_bad_values_say_what_to_change(overrides, message):
    overrides.setdefault("data", {})["dataset_name"] = "d"
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        build_config(overrides)


def test_no_data_is_an_error():
    with pytest.raises(ValueError, match="--train_file"):
        build_config({"training": {"loss_type": "standard"}})


def test_config_round_trips_through_yaml(tmp_path):
    cfg = parse_args("--standard_training --dataset d --surrogate_k 7 --eval_steps 5".split())
    path = tmp_path / "resolved.yaml"
    cfg.save(path)
    again = parse_args(["--config", str(path)])
    assert again == cfg and isinstance(again, TrainConfig)


# -- user errors: one message, exit code 2, no traceback (trainer.cli.main) ------------------------
YAML_ERRORS = {
    "syntax": ("model:\n  name_or_path: [gpt2\n", r"not valid YAML: .*line 3, column 1"),
    "wrong type": ("model: [1, 2]\n", r"section 'model' must be a mapping of key: value, got \[1, 2\]"),
    "top-level key": ("model_name: gpt2\n", r"top-level key 'model_name' is not a section .*"
                                           r"did you mean model: \{name_or_path: gpt2\}"),
    "top-level option": ("seed: 3\n", r"it belongs in section 'training': training: \{seed: 3\}"),
}


def _main(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``train.py ARGV`` run in this process."""
    from trainer.cli import main

    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def _assert_one_message(code: int, err: str, pattern: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("train.py: error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert re.search(pattern, err, re.DOTALL), err


@pytest.mark.parametrize("case", YAML_ERRORS)
def test_config_file_errors(tmp_path, capsys, case):
    text, pattern = YAML_ERRORS[case]
    path = tmp_path / "c.yaml"
    path.write_text(text)
    _assert_one_message(*_main(["--config", str(path), "--standard_training", "--dataset", "d"], capsys), pattern)


def test_missing_config_file(tmp_path, capsys):
    code, err = _main(["--config", str(tmp_path / "nope.yaml"), "--standard_training", "--dataset", "d"], capsys)
    _assert_one_message(code, err, r"config file '.*nope.yaml' does not exist")


# Errors found when training starts (the device, the hub): ValueErrors caught at the top of main().
START_UP_ERRORS = {
    "fp16 on cpu": (["--mixed_precision", "fp16", "--device", "cpu"],
                    r"fp16 mixed precision needs a CUDA GPU, not cpu: use --mixed_precision bf16 or no"),
    "tpu without torch_xla": (["--device", "tpu"],
                              r"--device tpu needs torch_xla, which is not installed: "
                              r"pip install 'sdce-training\[tpu\]'"),
    "hub name offline": (["--base_model", "sdce-tests/not-a-model"],
                         r"could not load the base tokenizer 'sdce-tests/not-a-model': .*the Hub is offline"),
}


def start_up_argv(case: str, tmp_path) -> list[str]:
    train_file = tmp_path / "train.txt"
    train_file.write_text("some text\n")
    return ["--standard_training", "--train_file", str(train_file), "--output_dir", str(tmp_path / "out"),
            "--no_progress_bar", *START_UP_ERRORS[case][0]]


def _skip_tpu_where_torch_xla_is(case: str) -> None:
    if case == "tpu without torch_xla" and importlib.util.find_spec("torch_xla") is not None:
        pytest.skip("torch_xla is installed (the XLA lane)")


@pytest.mark.parametrize("case", START_UP_ERRORS)
def test_start_up_errors(tmp_path, capsys, monkeypatch, case):
    _skip_tpu_where_torch_xla_is(case)
    monkeypatch.setenv("PJRT_DEVICE", "TPU")  # trainer.xla.launch sets it; monkeypatch puts it back
    _assert_one_message(*_main(start_up_argv(case, tmp_path), capsys), START_UP_ERRORS[case][1])


def test_debug_shows_the_traceback(tmp_path):
    from trainer.cli import main

    with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA GPU"):
        main([*start_up_argv("fp16 on cpu", tmp_path), "--debug"])
