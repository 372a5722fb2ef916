"""Several LoRA adapters active at once (``set_adapter(["a", "b"])``): the updates add up, as in HF PEFT."""

import pytest
import torch

from peftkit import (
    AdapterError,
    BitFitConfig,
    LoraConfig,
    PeftModel,
    PromptTuningConfig,
    get_peft_model,
)
from tests.tiny_models import TINY_MODELS, run

LLAMA, BERT = TINY_MODELS["llama"], TINY_MODELS["bert"]
A = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init="random")
B = dict(r=2, alpha=4, target_modules=["v_proj", "down_proj"], init="random", use_rslora=True)


def _two_adapters():
    model = get_peft_model(LLAMA.build(), LoraConfig(**A), adapter_name="a")
    model.add_adapter("b", LoraConfig(**B))
    with torch.no_grad():  # the embedding adapter starts with A = 0: give it an effect
        for p in model.adapter_parameters("a"):
            p.normal_(0, 0.1)
    return model


def _by_hand(model):
    """The base model with both adapters' updates added to its weights, computed from their tensors."""
    reference = LLAMA.build()
    weights = dict(reference.named_parameters())
    with torch.no_grad():
        for name in ("a", "b"):
            for key, tensor in model.adapter_state_dict(name).items():
                path = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
                config = model.peft_config[name]
                if key.endswith("lora_A.weight"):
                    B_ = model.adapter_state_dict(name)[key.replace("lora_A", "lora_B")]
                    weights[f"{path}.weight"] += config.scaling * B_ @ tensor
                elif key.endswith("lora_embedding_A"):
                    path = key.removeprefix("base_model.model.").rsplit(".", 1)[0]
                    B_ = model.adapter_state_dict(name)[key.replace("_A", "_B")]
                    weights[f"{path}.weight"] += config.scaling * (B_ @ tensor).T
    return reference


def test_active_updates_add_up_and_merge_and_unmerge_exactly():
    model = _two_adapters()
    batch = LLAMA.batch()
    alone = {name: (model.set_adapter(name), run(model, LLAMA, batch))[1] for name in ("a", "b")}
    model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a", "b"] and model.active_adapter == ["a", "b"]
    both = run(model, LLAMA, batch)
    assert not torch.allclose(both, alone["a"], atol=1e-3) and not torch.allclose(both, alone["b"], atol=1e-3)
    torch.testing.assert_close(both, run(_by_hand(model), LLAMA, batch), rtol=1e-5, atol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(run(model, LLAMA, batch), both, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert torch.equal(run(model, LLAMA, batch), both)
    torch.testing.assert_close(run(model.merge_and_unload(), LLAMA, batch), both, rtol=1e-5, atol=1e-5)


def test_both_active_adapters_train_and_save_separately(tmp_path):
    model = _two_adapters()
    model.set_adapter(["a", "b"])
    params = model.adapter_parameters("a") + model.adapter_parameters("b")
    assert all(p.requires_grad for p in params)
    model.train()
    batch = LLAMA.batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    model.eval()
    both = run(model, LLAMA, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(LLAMA.build(), tmp_path / "a", adapter_name="a")
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    loaded.set_adapter(["a", "b"])
    assert torch.equal(run(loaded, LLAMA, batch), both)


def test_logits_equal_hf_peft_with_both_adapters_active(tmp_path):
    peft = pytest.importorskip("peft")
    model = _two_adapters()
    model.set_adapter(["a", "b"])
    model.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(LLAMA.build(), tmp_path / "a", adapter_name="a")
    hf.load_adapter(tmp_path / "b", adapter_name="b")
    hf.base_model.set_adapter(["a", "b"])
    batch = LLAMA.batch()
    torch.testing.assert_close(run(model, LLAMA, batch), run(hf, LLAMA, batch), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "second, message",
    [
        (PromptTuningConfig(num_virtual_tokens=2), "changes the model's inputs"),
        (BitFitConfig(), "trains base-model parameters in place"),
        (LoraConfig(target_modules=["query"], modules_to_save=["classifier"]), "cannot combine two adapters"),
    ],
)
def test_adapters_that_cannot_combine_are_refused_with_a_message(second, message):
    model = get_peft_model(BERT.build(), LoraConfig(target_modules=["value"], modules_to_save=["classifier"]))
    model.add_adapter("other", second)
    with pytest.raises(AdapterError, match=message):
        model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"]
    for bad in ([], ["default", "default"], ["default", "missing"]):
        with pytest.raises(AdapterError):
            model.set_adapter(bad)
