"""Untrusted input at the adapter boundary: names that would be paths, files that leave the adapter folder,
sizes that would allocate terabytes, damaged or hostile files, and saves that must never leave a mix."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from peftkit import (
    BottleneckConfig,
    CheckpointError,
    ConfigError,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    get_peft_model,
)
from peftkit import checkpoint as ckpt
from peftkit.adapter_names import MAX_NAME_LENGTH
from tests.tiny_models import TINY_MODELS, run

MLP = TINY_MODELS["mlp"]
BAD_NAMES = [
    "/abs/path",
    "a/b",
    "..",
    ".",
    "../up",
    "a" * 300,
    "",
    "a b",
    "a\\b",
    "a.b",
    "é",
    "a\x00b",
    3,
    None,
]


def _model(name="default", r=4):
    return get_peft_model(MLP.build(), LoraConfig(r=r, init="random", target_modules=["0", "2"]), name)


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- names ---------------------------------------------------------------------------------------------

ENTRY_POINTS = {
    "get_peft_model": lambda name, d: _model(name),
    "add_adapter": lambda name, d: _model().add_adapter(name, LoraConfig(r=2, target_modules=["0"])),
    "from_pretrained": lambda name, d: PeftModel.from_pretrained(MLP.build(), d / "good", adapter_name=name),
    "load_adapter": lambda name, d: _model().load_adapter(d / "good", adapter_name=name),
    "set_adapter": lambda name, d: _model().set_adapter(name),
    "delete_adapter": lambda name, d: _model().delete_adapter(name),
    "save_pretrained": lambda name, d: _model().save_pretrained(d / "out", selected_adapters=[name]),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_adapter_names_are_refused_at_every_entry_point(entry, name, tmp_path):
    if isinstance(name, str) and name.startswith("/"):
        name = str(tmp_path / "outside")  # an absolute path the save would otherwise write into
    _model().save_pretrained(tmp_path / "good")
    before = _tree(tmp_path)
    with pytest.raises(
        ConfigError, match=r"adapter_name.*allowed: 1 to 64 ASCII letters, digits, '_' or '-'"
    ) as info:
        ENTRY_POINTS[entry](name, tmp_path)
    shown = repr(name)[:30] if not isinstance(name, str) or len(name) <= MAX_NAME_LENGTH else name[:40]
    assert shown.strip("'") in str(info.value) or type(name).__name__ in str(info.value)
    assert _tree(tmp_path) == before, "nothing is written anywhere"


@pytest.mark.parametrize("name", ["a-b_1", "A" * MAX_NAME_LENGTH, "default", "x9"])
def test_good_names_next_to_the_bounds_save_into_their_own_subfolder(name, tmp_path):
    model = _model()
    if name != "default":
        model.add_adapter(name, LoraConfig(r=2, init="random", target_modules=["0"]))
    model.save_pretrained(tmp_path / "d")
    folder = tmp_path / "d" if name == "default" else tmp_path / "d" / name
    loaded = PeftModel.from_pretrained(MLP.build(), folder, adapter_name=name)
    model.set_adapter(name)
    assert torch.equal(run(loaded, MLP, MLP.batch()), run(model, MLP, MLP.batch()))
    assert {p.name for p in tmp_path.iterdir()} == {"d"}, "no staging folder is left beside it"


# --- links ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("linked", [ckpt.WEIGHTS_NAME, ckpt.CONFIG_NAME])
def test_adapter_files_linked_outside_the_folder_are_refused(linked, tmp_path):
    _model().save_pretrained(tmp_path / "elsewhere")
    _model().save_pretrained(tmp_path / "a")
    (tmp_path / "a" / linked).unlink()
    (tmp_path / "a" / linked).symlink_to(tmp_path / "elsewhere" / linked)
    with pytest.raises(CheckpointError, match=rf"{linked} is a link to .*outside the adapter folder"):
        PeftModel.from_pretrained(MLP.build(), tmp_path / "a")


def test_links_inside_the_folder_and_a_linked_folder_load(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / ckpt.WEIGHTS_NAME).rename(tmp_path / "a" / "real.safetensors")
    (tmp_path / "a" / ckpt.WEIGHTS_NAME).symlink_to("real.safetensors")
    (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
    for folder in (tmp_path / "a", tmp_path / "link"):
        loaded = PeftModel.from_pretrained(MLP.build(), folder)
        assert torch.equal(run(loaded, MLP, MLP.batch()), run(model, MLP, MLP.batch()))


# --- sizes bounded against the model -------------------------------------------------------------------


def test_lora_rank_is_bounded_by_each_layer_and_the_error_names_it():
    with pytest.raises(ConfigError, match=r"`r`=1000000000 .*layer '0'.* 10 x 16.*r <= 10"):
        _model(r=10**9)
    with pytest.raises(ConfigError, match=r"`r`=11 .*layer '0'"):
        _model(r=11)
    assert _model(r=10).peft_config["default"].r == 10  # the bound itself is allowed


def test_virtual_tokens_are_bounded_by_the_model_positions():
    gpt2 = TINY_MODELS["gpt2"]
    with pytest.raises(ConfigError, match=r"`num_virtual_tokens`=1000000000 exceeds the 32 positions"):
        get_peft_model(gpt2.build(), PromptTuningConfig(num_virtual_tokens=10**9))
    with pytest.raises(ConfigError, match="`num_virtual_tokens`=33"):
        get_peft_model(gpt2.build(), PromptTuningConfig(num_virtual_tokens=33))
    get_peft_model(gpt2.build(), PromptTuningConfig(num_virtual_tokens=32))


@pytest.mark.parametrize(
    "config",
    [
        lambda n: BottleneckConfig(bottleneck_size=n),
        lambda n: PTuningConfig(encoder_hidden_size=n),
        lambda n: PrefixTuningConfig(projection_size=n),
    ],
)
def test_widths_a_method_adds_are_bounded_by_the_hidden_size(config):
    gpt2 = TINY_MODELS["gpt2"]  # hidden size 32: up to 16 x 32 = 512
    with pytest.raises(
        ConfigError, match=r"=1000000000 is beyond 16 x the hidden size 32; allowed: 1 to 512"
    ):
        get_peft_model(gpt2.build(), config(10**9))
    with pytest.raises(ConfigError, match=r"=513 is beyond"):
        get_peft_model(gpt2.build(), config(513))
    get_peft_model(gpt2.build(), config(512))


def test_a_config_file_with_a_huge_rank_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
    _model().save_pretrained(tmp_path)
    config, tensors = ckpt.read_adapter(tmp_path)
    ckpt.write_adapter(tmp_path, {**config, "r": 1_000_000_000}, tensors)
    monkeypatch.setattr(ckpt.AdapterFiles, "read", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(ConfigError, match=r"adapter_config.json: `r`=1000000000 .*layer '0'"):
        PeftModel.from_pretrained(MLP.build(), tmp_path)


def _huge_extra_key(folder, size):
    """Add a key of ``size`` float32 values to the weights as a sparse file: nothing is really written."""
    path = folder / ckpt.WEIGHTS_NAME
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["base_model.model.4.huge"] = {
        "dtype": "F32",
        "shape": [size],
        "data_offsets": [end, end + 4 * size],
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text + data[8 + length :])
        handle.truncate(8 + len(text) + end + 4 * size)


def test_a_huge_extra_key_is_refused_from_the_header_alone(tmp_path, monkeypatch):
    _model().save_pretrained(tmp_path)
    _huge_extra_key(tmp_path, 10**9)  # 4 GB, sparse
    monkeypatch.setattr(ckpt.AdapterFiles, "read", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['base_model.model.4.huge'\]"):
        PeftModel.from_pretrained(MLP.build(), tmp_path)


# --- damaged and hostile files -------------------------------------------------------------------------


def _rewrite(folder, change):
    _, tensors = ckpt.read_adapter(folder)
    tensors = {k: change(v) for k, v in tensors.items()}
    save_file(tensors, str(folder / ckpt.WEIGHTS_NAME), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("change", "dtype"), [(lambda t: t.long(), "I64"), (lambda t: t > 0, "BOOL"), (lambda t: t.int(), "I32")]
)
def test_integer_and_bool_tensors_are_refused_not_cast(change, dtype, tmp_path):
    _model().save_pretrained(tmp_path)
    _rewrite(tmp_path, change)
    with pytest.raises(
        CheckpointError, match=rf"tensor 'base_model.model.0.lora_A.weight' is stored as {dtype}"
    ):
        PeftModel.from_pretrained(MLP.build(), tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor_unless_allowed(bad, tmp_path):
    _model().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.index_fill(0, torch.tensor([0]), bad))
    with pytest.raises(
        CheckpointError, match=r"tensor 'base_model.model.0.lora_A.weight' holds \d+ NaN or infinite"
    ):
        PeftModel.from_pretrained(MLP.build(), tmp_path)
    loaded = PeftModel.from_pretrained(MLP.build(), tmp_path, check_finite=False)
    assert not torch.isfinite(loaded.adapter_state_dict("default")["base_model.model.0.lora_A.weight"]).all()


def _damage(kind, path):
    data = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(os.urandom(len(data)))
    elif kind == "huge header":
        path.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    elif kind == "header only":
        path.write_bytes(data[:12])


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "huge header", "header only"])
def test_damaged_weights_get_an_error_naming_the_file(kind, tmp_path):
    _model().save_pretrained(tmp_path)
    _damage(kind, tmp_path / ckpt.WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=rf"{ckpt.WEIGHTS_NAME}"):
        PeftModel.from_pretrained(MLP.build(), tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "must hold a JSON object"),
        ('"lora"', "must hold a JSON object"),
        ("{", "is not valid JSON"),
        ("", "is not valid JSON"),
        (b"\xff\xfe", "is not valid JSON"),
    ],
)
def test_bad_config_files_get_an_error_naming_the_file(text, message, tmp_path):
    _model().save_pretrained(tmp_path)
    path = tmp_path / ckpt.CONFIG_NAME
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises((CheckpointError, ConfigError), match=rf"{ckpt.CONFIG_NAME}.*{message}"):
        PeftModel.from_pretrained(MLP.build(), tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: {}, "`peft_type`=None"),
        (lambda c: {**c, "peft_type": "NOPE"}, "`peft_type`='NOPE'"),
        (lambda c: {**c, "r": "8"}, "`r` must be a positive integer, got '8'"),
        (lambda c: {**c, "r": -1}, "`r` must be a positive integer, got -1"),
        (lambda c: {**c, "lora_alpha": [1]}, "alpha"),
        (lambda c: {**c, "target_modules": 5}, "target_modules"),
        (lambda c: {**c, "target_modules": ["nothing_like_this"]}, "nothing_like_this"),
    ],
)
def test_config_fields_a_file_gets_wrong_are_named_with_the_file(change, message, tmp_path):
    _model().save_pretrained(tmp_path)
    config, tensors = ckpt.read_adapter(tmp_path)
    ckpt.write_adapter(tmp_path, change(config), tensors)
    with pytest.raises((CheckpointError, ConfigError), match=rf"{ckpt.CONFIG_NAME}.*{message}"):
        PeftModel.from_pretrained(MLP.build(), tmp_path)


@pytest.mark.parametrize(("text", "message"), [("[]", "must hold a JSON object"), ("{", "is not valid JSON")])
def test_auto_classes_name_the_bad_config_file(text, message, tmp_path):
    from peftkit import AutoPeftModel

    _model().save_pretrained(tmp_path)
    (tmp_path / ckpt.CONFIG_NAME).write_text(text)
    with pytest.raises(CheckpointError, match=rf"{ckpt.CONFIG_NAME}.*{message}"):
        AutoPeftModel.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="allowed: 1 to 64"):
        AutoPeftModel.from_pretrained(tmp_path, adapter_name="../x")
