"""After optimizer steps, only the adapter's parameters (and modules_to_save) have changed."""

import pytest
import torch

from peftkit import LoraConfig, get_peft_model
from tests.tiny_models import TINY_MODELS


def _loss(model, tiny, batch):
    if tiny.name == "mlp":
        return model(batch["input"]).pow(2).mean()
    return model(**batch).logits.pow(2).mean()


def _train(model, tiny, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        _loss(model, tiny, tiny.batch(seed=step)).backward()
        optimizer.step()


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_only_adapter_parameters_change(tiny, bias):
    modules_to_save = ["classifier"] if tiny.name == "bert" else None
    config = LoraConfig(r=4, target_modules=tiny.targets, bias=bias, modules_to_save=modules_to_save)
    model = get_peft_model(tiny.build(), config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable, "something must train"
    before = _snapshot(model)
    _train(model, tiny)
    after = _snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed <= trainable
    frozen = set(before) - trainable
    assert all(torch.equal(before[n], after[n]) for n in frozen), "every frozen tensor is bit-identical"
    assert any("lora_B" in n for n in changed), "B moved away from zero"
    if modules_to_save:
        assert any(".modules_to_save.default." in n for n in changed)
        assert not any(".original_module." in n for n in changed)
    changed_base_biases = {n for n in changed if n.endswith(".bias") and "modules_to_save" not in n}
    if bias == "none":
        assert not changed_base_biases
    elif any(n.endswith(".bias") for n in frozen | trainable):  # LLaMA and T5 have no biases
        assert changed_base_biases


def test_bias_training_keeps_the_base_model_recoverable():
    """Trained biases are per adapter: disabling, switching or unloading gives back the base biases."""
    tiny = TINY_MODELS["bert"]
    reference = tiny.build()
    model = get_peft_model(tiny.build(), LoraConfig(r=4, bias="all"))
    _train(model, tiny)
    model.eval()
    batch = tiny.batch()
    with torch.no_grad():
        expected = reference(**batch).logits
        adapted = model(**batch).logits
        with model.disable_adapter():
            assert torch.equal(model(**batch).logits, expected)
        assert torch.equal(model(**batch).logits, adapted)
        model.add_adapter("other", LoraConfig(r=2))
        model.set_adapter("other")
        assert torch.equal(model(**batch).logits, expected)  # the new adapter starts at zero, on base biases
        model.set_adapter("default")
        assert torch.equal(model(**batch).logits, adapted)
        assert torch.equal(model.unload()(**batch).logits, expected)


def test_gradients_reach_only_the_active_adapter():
    tiny = TINY_MODELS["llama"]
    model = get_peft_model(tiny.build(), LoraConfig(r=4))
    model.add_adapter("second", LoraConfig(r=2))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    model.set_adapter("second")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".second." in n for n in trainable)
