"""Training settings derive from the methods' declarations: each method's options and learning rate, the
flags, the README's method list; an option of another method is refused, not ignored."""

import re
from pathlib import Path

import pytest
import yaml

from peftkit.cli.compare import parse_method_settings
from peftkit.cli.main import build_parser, main
from peftkit.cli.train import config_from_args
from peftkit.config import AdapterConfig, ConfigError
from peftkit.method_spec import METHOD_SPECS, all_options
from peftkit.methods import METHODS
from peftkit.training.config import TrainConfig
from peftkit.training.layout import RunFolder

README = Path(__file__).resolve().parents[1] / "README.md"


def _train_args(*flags):
    return config_from_args(build_parser().parse_args(["train", *flags]))


def test_every_method_starts_from_its_own_learning_rate_unless_one_is_given():
    expected = {"lora": 2e-3, "qlora": 2e-3, "ia3": 5e-3, "full": 5e-5, "prompt_tuning": 3e-2}
    for method, rate in expected.items():
        assert METHOD_SPECS[method].learning_rate == rate
        assert _train_args("--method", method).learning_rate == rate
        assert TrainConfig(method=method).learning_rate == rate
    assert _train_args("--method", "prompt_tuning", "--learning-rate", "1e-3").learning_rate == 1e-3
    assert _train_args().learning_rate == 2e-3  # the default run (LoRA) is unchanged
    # a built-in dataset may move a method's working point; the others keep their own
    assert TrainConfig(method="lora", dataset="wnut16").learning_rate == 5e-4
    assert TrainConfig(method="ia3", dataset="wnut16").learning_rate == 5e-3


def test_an_option_of_another_method_is_refused(tmp_path, capsys):
    assert main(["train", "--method", "ia3", "--r", "4"]) == 2
    error = capsys.readouterr().err
    assert "`r` is an option of lora, qlora, not of ia3" in error and "target_modules" in error
    with pytest.raises(ConfigError, match="`num_virtual_tokens` is an option of"):
        TrainConfig.from_sources(None, {"method": "lora", "num_virtual_tokens": 4})
    (tmp_path / "run.yaml").write_text("method: full\ndropout: 0.0\n")
    with pytest.raises(ConfigError, match="`dropout` is an option of lora, qlora, not of full"):
        TrainConfig.from_sources(tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match="unknown training setting"):
        TrainConfig.from_sources(None, {"rank": 4})
    with pytest.raises(ConfigError, match="`method` must be one of"):
        TrainConfig(method="no_such_method")


def test_method_options_reach_the_adapter_config():
    config = _train_args("--method", "bottleneck", "--placement", "houlsby", "--bottleneck-size", "8")
    assert config.options == {"placement": "houlsby", "bottleneck_size": 8}
    built = METHOD_SPECS["bottleneck"].build(config.options, ["classifier"])
    assert (built.placement, built.bottleneck_size, built.modules_to_save) == ("houlsby", 8, ("classifier",))
    assert _train_args("--target-modules", "query", "value").options["target_modules"] == ["query", "value"]
    assert TrainConfig.from_dict(config.to_dict()) == config  # the saved form reads back the same


def test_every_declared_method_builds_a_registered_adapter_config():
    for name, spec in METHOD_SPECS.items():
        built = spec.build(spec.defaults(), [])
        assert isinstance(built, AdapterConfig) and built.method in METHODS, name
        assert spec.learning_rate > 0 and spec.summary, name
    for name, (option, methods) in all_options().items():
        assert option.help and methods, name


def test_a_config_saved_before_options_belonged_to_their_method_still_reads(tmp_path):
    legacy = {**TrainConfig(method="ia3").to_dict(), "r": 8, "alpha": 16, "dropout": 0.1, "top_k": 2}
    legacy |= {"placement": "pfeiffer", "bottleneck_size": 32, "num_virtual_tokens": 20}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(legacy))
    config = RunFolder(tmp_path).read_config()
    assert config.method == "ia3" and config.options == {"target_modules": "all-linear"}
    legacy["r"] = 4  # a value somebody chose is not dropped silently
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(legacy))
    with pytest.raises(ConfigError, match="`r` is an option of"):
        RunFolder(tmp_path).read_config()


def test_compare_applies_an_option_to_the_methods_that_take_it_and_refuses_the_rest(capsys):
    assert parse_method_settings(["lora.r=16"], ["lora"]) == {"lora": {"r": 16}}
    with pytest.raises(ConfigError, match="`r` is an option of lora, qlora, not of ia3"):
        parse_method_settings(["ia3.r=4"], ["ia3"])
    assert main(["compare", "--methods", "lora", "ia3", "--placement", "houlsby"]) == 2
    assert (
        "`placement` is an option of bottleneck, none of which is among --methods" in capsys.readouterr().err
    )


def test_the_readme_lists_every_declared_method():
    listed = re.search(r"- \*\*Methods\*\*: `--method ([^`]+)`", README.read_text()).group(1)
    listed = [name.strip() for name in listed.split("|")]
    assert sorted(listed) == sorted(METHOD_SPECS)
