"""Adapter files: only adapter tensors, exact round trips, atomic writes, no pickles, clear mismatch errors."""

import json
import pickle
import struct

import pytest
import torch
from safetensors import safe_open

from peftkit import CheckpointError, LoraConfig, PeftModel, get_peft_model
from peftkit import checkpoint as ckpt
from tests.tiny_models import TINY_MODELS, run


def _trained(tiny, **overrides):
    config = LoraConfig(r=4, init="random", target_modules=tiny.targets, **overrides)
    return get_peft_model(tiny.build(), config)


def test_save_then_load_reproduces_outputs_exactly(tiny, tmp_path):
    modules_to_save = ["classifier"] if tiny.name == "bert" else None
    model = _trained(tiny, modules_to_save=modules_to_save, bias="all")
    with torch.no_grad():  # as if trained: move heads and biases off their initial values
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    expected = run(model, tiny, tiny.batch())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny.build(), tmp_path)
    assert torch.equal(run(loaded, tiny, tiny.batch()), expected)
    assert not any(p.requires_grad for p in loaded.parameters()), "loaded for inference by default"
    trainable = PeftModel.from_pretrained(tiny.build(), tmp_path, is_trainable=True)
    assert trainable.trainable_parameters().trainable == model.trainable_parameters().trainable


def test_file_holds_only_adapter_tensors_and_its_size_is_the_parameter_count(tiny, tmp_path):
    model = _trained(tiny)
    model.save_pretrained(tmp_path)
    path = tmp_path / ckpt.WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys and all(".lora_" in k for k in keys), "no base weight is written"
    count = model.trainable_parameters()
    assert count.adapter == count.trainable
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert path.stat().st_size == 8 + header + count.trainable * 4  # fp32 tensors + the safetensors header
    assert count.adapter_bytes == count.trainable * 4
    assert header < 4096 + 200 * len(keys)


def test_modules_to_save_is_saved_under_its_plain_name(tmp_path):
    tiny = TINY_MODELS["bert"]
    model = _trained(tiny, modules_to_save=["classifier"])
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / ckpt.WEIGHTS_NAME), framework="pt") as handle:
        keys = set(handle.keys())
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys


def test_several_adapters_save_in_the_hf_layout(tmp_path):
    tiny = TINY_MODELS["llama"]
    model = _trained(tiny)
    model.add_adapter("second", LoraConfig(r=2, init="random", target_modules=["k_proj"]))
    model.save_pretrained(tmp_path)
    assert (tmp_path / ckpt.CONFIG_NAME).is_file() and (tmp_path / "second" / ckpt.CONFIG_NAME).is_file()
    model.set_adapter("second")
    expected = run(model, tiny, tiny.batch())
    loaded = PeftModel.from_pretrained(tiny.build(), tmp_path / "second", adapter_name="second")
    assert torch.equal(run(loaded, tiny, tiny.batch()), expected)


def test_interrupted_save_leaves_the_previous_adapter_loadable(tmp_path, monkeypatch):
    tiny = TINY_MODELS["mlp"]
    model = _trained(tiny)
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _trained(tiny).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "no temporary file is left behind"
    PeftModel.from_pretrained(tiny.build(), tmp_path)


def test_weights_and_config_from_different_saves_are_refused(tmp_path):
    tiny = TINY_MODELS["mlp"]
    _trained(tiny).save_pretrained(tmp_path / "a")
    _trained(tiny, alpha=16).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / ckpt.CONFIG_NAME).write_bytes((tmp_path / "b" / ckpt.CONFIG_NAME).read_bytes())
    with pytest.raises(CheckpointError, match="different saves"):
        PeftModel.from_pretrained(tiny.build(), tmp_path / "a")


class _Exploit:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_pickled_weights_are_refused(tmp_path, capsys):
    tiny = TINY_MODELS["mlp"]
    model = _trained(tiny)
    model.save_pretrained(tmp_path)
    (tmp_path / ckpt.WEIGHTS_NAME).unlink()
    with open(tmp_path / ckpt.LEGACY_WEIGHTS_NAME, "wb") as handle:
        pickle.dump({"x": _Exploit()}, handle)
    with pytest.raises(CheckpointError, match="refusing to load"):
        PeftModel.from_pretrained(tiny.build(), tmp_path)
    assert "this ran" not in capsys.readouterr().out


def test_legacy_bin_with_only_tensors_loads(tmp_path):
    tiny = TINY_MODELS["mlp"]
    model = _trained(tiny)
    model.save_pretrained(tmp_path)
    (tmp_path / ckpt.WEIGHTS_NAME).unlink()
    torch.save(
        {k: v.detach().clone() for k, v in model.adapter_state_dict("default").items()},
        tmp_path / "adapter_model.bin",
    )
    loaded = PeftModel.from_pretrained(tiny.build(), tmp_path)
    assert torch.equal(run(loaded, tiny, tiny.batch()), run(model, tiny, tiny.batch()))


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    tiny = TINY_MODELS["mlp"]
    _trained(tiny).save_pretrained(tmp_path)
    config = json.loads((tmp_path / ckpt.CONFIG_NAME).read_text())
    tensors = ckpt.read_adapter(tmp_path)[1]
    tensors["base_model.model.0.lora_A.weight"] = torch.zeros(4, 11)
    ckpt.write_adapter(tmp_path, config, tensors)
    base = tiny.build()
    with pytest.raises(
        CheckpointError, match=r"'base_model.model.0.lora_A.weight' has shape \(4, 11\).*expects \(4, 10\)"
    ):
        PeftModel.from_pretrained(base, tmp_path)


def test_missing_key_is_named_and_nothing_half_loaded_remains(tmp_path):
    tiny = TINY_MODELS["mlp"]
    model = _trained(tiny)
    model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / ckpt.CONFIG_NAME).read_text())
    tensors = ckpt.read_adapter(tmp_path / "a")[1]
    del tensors["base_model.model.2.lora_B.weight"]
    ckpt.write_adapter(tmp_path / "b", config, tensors)
    with pytest.raises(CheckpointError, match=r"missing keys \['base_model.model.2.lora_B.weight'\]"):
        model.load_adapter(tmp_path / "b", adapter_name="broken")
    assert "broken" not in model.peft_config
    assert not any(".broken." in n for n, _ in model.named_parameters())
