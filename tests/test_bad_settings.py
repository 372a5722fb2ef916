"""Every numeric and switch setting of a training run has one allowed range (peftkit/training/ranges.py), and
the command line, a YAML file and Python agree on it: a value outside is an error naming the flag or key and
what is allowed, before anything is loaded or written; a value inside does what it says."""

import math
import typing

import pytest

from peftkit.cli.main import build_parser, main
from peftkit.cli.train import config_from_args
from peftkit.config import ConfigError
from peftkit.training import batches
from peftkit.training.config import TrainConfig
from peftkit.training.ranges import SETTING_RANGES

# setting -> (values refused, values accepted) at its ends and beyond; every ranged setting is listed
CASES = {
    "limit": ([0, -1, 2.5, math.inf], [1, None]),
    "train_size": ([0, -1, 2.5, True], [1, None]),
    "data_seed": ([-1, 2.5, 2**63], [0, None]),
    "epochs": ([0, -1, math.nan, math.inf, -math.inf], [0.25, 1e-3, 3]),
    "max_steps": ([0, -1, 2.5, math.nan], [1, None]),
    "batch_size": ([0, -4, 1.0, 2.5], [1]),
    "gradient_accumulation": ([0, -1, 1.5], [1, 4]),
    "learning_rate": ([0, -1e-3, math.inf, math.nan, -math.inf], [1e-5, 2]),
    "head_learning_rate": ([0, -1, math.inf, math.nan], [1e-3]),
    "weight_decay": ([-10, -1e-9, math.inf, math.nan], [0, 0.1]),
    "warmup_ratio": ([-0.1, 1, 1.5, math.nan], [0, 0.99]),
    "max_grad_norm": ([-1, -1e-9, math.inf, math.nan], [0, 1, None]),
    "max_length": ([0, -8, 8.5], [1, 48]),
    "seed": ([-1, 2**63, 1.5], [0, 2**63 - 1]),
    "eval_every": ([0, -1, 2.5], [1]),
    "eval_batch_size": ([0, -1], [1]),
    "eval_limit": ([0, -1, 0.5], [1, None]),
    "early_stopping_patience": ([0, -1, 1.5], [1, None]),
    "save_every": ([0, -1], [1]),
    "bf16": ([1, "yes", None], [True, False]),
    "gradient_checkpointing": ([0, "no"], [False]),
    "fused_loss": ([2, None], [True]),
    "group_by_length": ([1, "auto"], [None, True]),
    "packing": ([1], [False]),
    "check_finite": ([0, "on"], [True, False]),
    "fsdp": ([1, "yes"], [False]),
    "resume": (["true", None], [False]),
}


def test_every_numeric_and_switch_setting_has_a_range_and_is_tested():
    hints = typing.get_type_hints(TrainConfig)
    ranged = {
        name for name, hint in hints.items() if {int, float, bool} & ({hint} | set(typing.get_args(hint)))
    }
    assert ranged == set(SETTING_RANGES)  # a new setting cannot skip its range
    assert set(CASES) == set(SETTING_RANGES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_python_and_yaml_refuse_the_same_values_naming_the_setting(name, tmp_path):
    bad, good = CASES[name]
    allowed = SETTING_RANGES[name].allowed()
    for value in bad:
        with pytest.raises(ConfigError, match=f"`{name}` must be {_escape(allowed)}, got "):
            TrainConfig(**{name: value})
        with pytest.raises(ConfigError, match=f"`{name}` must be"):
            TrainConfig.from_dict({name: value})
        (tmp_path / "run.yaml").write_text(f"{name}: {_yaml(value)}\n")
        with pytest.raises(ConfigError, match=f"run.yaml: `{name}` must be"):
            TrainConfig.from_sources(tmp_path / "run.yaml")
    for value in good:
        assert getattr(TrainConfig(**{name: value}), name) == value


def _yaml(value):
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return f"'{value}'" if isinstance(value, str) else value


def _escape(text):
    import re

    return re.escape(text)


FLAG_CASES = [
    ("--max-grad-norm", "-1", "finite number >= 0, or none (no clipping)"),
    ("--learning-rate", "inf", "finite number > 0"),
    ("--learning-rate", "nan", "finite number > 0"),
    ("--learning-rate", "0", "finite number > 0"),
    ("--learning-rate", "-1e-4", "finite number > 0"),
    ("--epochs", "0", "finite number > 0"),
    ("--epochs", "-1", "finite number > 0"),
    ("--max-steps", "2.5", "integer >= 1, or none"),
    ("--max-steps", "0", "integer >= 1, or none"),
    ("--weight-decay", "-10", "finite number >= 0"),
    ("--early-stopping-patience", "-1", "integer >= 1, or none (never stop early)"),
    ("--early-stopping-patience", "0", "integer >= 1"),
    ("--eval-limit", "0", "integer >= 1, or none (the whole validation split)"),
    ("--limit", "0", "integer >= 1, or none (all records)"),
    ("--warmup-ratio", "1", "finite number in [0, 1)"),
    ("--batch-size", "0", "integer >= 1"),
    ("--seed", "-3", "integer in [0, 9.22337e+18)"),
    ("--bf16", "maybe", None),
]


@pytest.mark.parametrize(("flag", "value", "allowed"), FLAG_CASES)
def test_a_bad_flag_is_a_usage_error_naming_the_flag(flag, value, allowed, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--output-dir", str(tmp_path / "out"), f"{flag}={value}"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"peftkit train: error: argument {flag}")
    if allowed is not None:
        assert allowed in error
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_bad_method_option_is_refused_before_the_run_folder_is_made(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path / "out"), "--r", "-1"]) == 2
    assert "peftkit train: error: --r: `r` must be a positive integer, got -1" in capsys.readouterr().err
    flags = ["--method", "bottleneck", "--bottleneck-size", "0", "--output-dir", str(tmp_path / "out")]
    assert main(["train", *flags]) == 2
    assert "error: --bottleneck-size: `bottleneck_size` must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="`dropout`"):
        TrainConfig(options={"dropout": 1.5})


def test_none_given_on_the_command_line_overrides_the_default(tmp_path):
    config = config_from_args(build_parser().parse_args(["train", "--max-steps", "none", "--epochs", "0.25"]))
    assert (config.max_steps, config.epochs) == (None, 0.25)
    # a quarter of an epoch of 10 steps is 3 steps (rounded up), not the default 400
    assert batches.total_steps(config.max_steps, config.epochs, per_epoch=10) == 3
    assert batches.total_steps(None, 1e-3, per_epoch=10) == 1
    (tmp_path / "run.yaml").write_text("max_steps: 50\neval_limit: 10\nmax_grad_norm: 2\n")
    flags = ["--config", str(tmp_path / "run.yaml"), "--max-steps", "none", "--eval-limit", "none"]
    config = config_from_args(build_parser().parse_args(["train", *flags]))
    assert (config.max_steps, config.eval_limit, config.max_grad_norm) == (None, None, 2.0)
    flags = ["--config", str(tmp_path / "run.yaml"), "--max-grad-norm", "none"]
    assert config_from_args(build_parser().parse_args(["train", *flags])).max_grad_norm is None
    assert (
        config_from_args(build_parser().parse_args(["train"])).max_steps == TrainConfig.max_steps
    )  # default


def test_adamw_decay_that_would_flip_the_weights_is_refused():
    with pytest.raises(ConfigError, match=r"`learning_rate` x `weight_decay` must be below 1, got 1 x 2"):
        TrainConfig(learning_rate=1.0, weight_decay=2.0)
    assert TrainConfig(learning_rate=1e-3, weight_decay=10).weight_decay == 10.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: [1\n", r"run.yaml, line 2, column 1: not valid YAML"),
        ("epochs: 1\n  max_steps: 2\n", r"run.yaml, line 2, column \d+: not valid YAML"),
        ("- epochs\n", r"run.yaml: expected a mapping of settings, got list"),
        ("1: 2\n", r"run.yaml: setting names must be text, got 1"),
        ("columns: review\n", r"run.yaml: `columns` must be a mapping of column roles"),
        (
            "columns: {txt: review}\n",
            r"run.yaml: unknown column role\(s\) \['txt'\] in `columns`; known: text",
        ),
        ("columns: {text: 3}\n", r"run.yaml: `columns.text` must be a non-empty column name, got 3"),
        ("columns: [text]\n", r"run.yaml: `columns` must be a mapping"),
        ("task: regression\n", r"`task` must be one of sequence-classification"),
        ("model: ''\n", r"`model` must be a non-empty name or path"),
        ("epochs: .nan\n", r"run.yaml: `epochs` must be a finite number > 0, got nan"),
        ("epochs: -1\n", r"run.yaml: `epochs` must be a finite number > 0, got -1"),
        (
            "max_steps: 2.5\n",
            r"run.yaml: `max_steps` must be an integer >= 1, or none \(run `epochs` epochs\), got 2.5",
        ),
        ("max_steps: '2.5'\n", r"run.yaml: `max_steps` must be an integer"),
        ("bf16: 1\n", r"run.yaml: `bf16` must be true or false, got 1"),
        ("rank: 4\n", r"run.yaml: unknown training setting\(s\) \['rank'\]"),
    ],
)
def test_yaml_errors_name_the_file_and_the_key(text, message, tmp_path):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_sources(tmp_path / "run.yaml")


def test_an_unreadable_settings_file_is_named(tmp_path, capsys):
    (tmp_path / "bytes.yaml").write_bytes(b"\xff\xfe\x00bad")
    for path, message in [
        (tmp_path / "missing.yaml", "cannot read the settings file: No such file or directory"),
        (tmp_path, "cannot read the settings file: Is a directory"),
        (tmp_path / "bytes.yaml", "not a YAML settings file (not UTF-8 text)"),
    ]:
        assert main(["train", "--config", str(path), "--output-dir", str(tmp_path / "out")]) == 2
        assert f"peftkit train: error: {path}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compare_reads_the_same_ranges(tmp_path, capsys):
    (tmp_path / "lab.yaml").write_text("epochs: -1\n")
    flags = ["--config", str(tmp_path / "lab.yaml"), "--output-dir", str(tmp_path / "lab")]
    assert main(["compare", *flags]) == 2
    assert f"peftkit compare: error: {tmp_path / 'lab.yaml'}: `epochs` must be a finite number > 0" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--max-grad-norm", "-1", "--output-dir", str(tmp_path / "lab")])
    assert exit_.value.code == 2
    assert "peftkit compare: error: argument --max-grad-norm" in capsys.readouterr().err
    assert not (tmp_path / "lab").exists()
