"""LoRA with generate(), mixed-batch generation, and gradient checkpointing on a decoder."""

import torch

from peftkit import BASE_ROW, LoraConfig, get_peft_model
from tests.tiny_models import TINY_MODELS

TINY = TINY_MODELS["llama"]


def _greedy(model, ids, **kwargs):
    mask = torch.ones_like(ids)
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, **kwargs
    )


def test_generate_uses_the_active_adapter_and_mixed_rows_match():
    model = get_peft_model(TINY.build(), LoraConfig(r=4, alpha=32, init="random"))
    model.add_adapter("b", LoraConfig(r=2, alpha=32, init="random", target_modules="all-linear"))
    ids = TINY.batch()["input_ids"]
    by_adapter = {"default": _greedy(model, ids)}
    model.set_adapter("b")
    by_adapter["b"] = _greedy(model, ids)
    with model.disable_adapter():
        by_adapter[BASE_ROW] = _greedy(model, ids)
    assert not torch.equal(by_adapter["default"], by_adapter[BASE_ROW]), (
        "the adapter must change what is generated"
    )
    rows = ["default", "b", BASE_ROW]
    mixed = _greedy(model, ids, adapter_names=rows)
    for row, name in enumerate(rows):
        assert torch.equal(mixed[row], by_adapter[name][row])


def test_gradient_checkpointing_trains_the_adapter_and_matches_plain_gradients():
    ids = TINY.batch()["input_ids"]
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(TINY.build(), LoraConfig(r=4, init="random"))
        if checkpointing:
            model.base_model.gradient_checkpointing_enable()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
