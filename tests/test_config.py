"""LoraConfig: validated at construction with messages naming field, value and what is allowed; JSON round trip."""

import pytest

from peftkit import AdapterConfig, ConfigError, LoraConfig


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("r", 0, r"`r` must be a positive integer, got 0"),
        ("r", -3, r"`r` must be a positive integer, got -3"),
        ("r", 2.5, r"`r` must be a positive integer, got 2.5"),
        ("r", True, r"`r` must be a positive integer, got True"),
        ("dropout", 1.0, r"`dropout` must be a number in \[0.0, 1.0\), got 1.0"),
        ("dropout", -0.1, r"`dropout` must be a number in \[0.0, 1.0\), got -0.1"),
        ("alpha", -1, r"`alpha` must be a number in \[0, inf\), got -1"),
        ("bias", "some", r"`bias` must be one of \['none', 'all', 'lora_only'\], got 'some'"),
        ("init", "zeros", r"`init` must be one of \['default', 'gaussian', 'random'\], got 'zeros'"),
        ("target_modules", [], r"`target_modules` must not be an empty list"),
        (
            "target_modules",
            [3],
            r"`target_modules` must be a string or a list of non-empty strings, got \[3\]",
        ),
        ("layers_to_transform", [-1], r"`layers_to_transform` must be a non-negative integer"),
        ("use_rslora", "yes", r"`use_rslora` must be true or false, got 'yes'"),
        ("modules_to_save", "classifier", None),  # a single name is accepted as a list of one
    ],
)
def test_invalid_values_name_the_field_and_the_allowed_values(field, value, message):
    if message is None:
        assert LoraConfig(**{field: value}).modules_to_save == ("classifier",)
        return
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**{field: value})


def test_json_round_trip():
    config = LoraConfig(
        r=16,
        alpha=32,
        dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=r".*\.0\..*",
        layers_to_transform=[0, 2],
        bias="lora_only",
        use_rslora=True,
        modules_to_save=["score"],
        init="gaussian",
    )
    assert AdapterConfig.from_json(config.to_json()) == config
    assert LoraConfig.from_hf_dict(config.to_hf_dict(["q_proj", "v_proj"])) == config


def test_scaling():
    assert LoraConfig(r=4, alpha=8).scaling == 2.0
    assert LoraConfig(r=4, alpha=8, use_rslora=True).scaling == 4.0


def test_unknown_fields_and_methods_are_refused():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['rank'\]"):
        AdapterConfig.from_dict({"method": "lora", "rank": 4})
    with pytest.raises(ConfigError, match="`method` must be one of"):
        AdapterConfig.from_dict({"method": "magic"})


def test_configs_are_immutable():
    config = LoraConfig()
    with pytest.raises(AttributeError):
        config.r = 4
