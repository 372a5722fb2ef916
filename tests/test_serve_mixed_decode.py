"""The mixed-batch LoRA path as `peftkit serve` drives it: one token per row, the same batch composition for
many steps (the per-row matrices are gathered once and kept), then rows leaving, joining and reordering,
adapters changing in place or replaced under the same name. Every row must equal its adapter run alone."""

from __future__ import annotations

import torch

from peftkit import LoraConfig, get_peft_model
from peftkit.layer import BASE_ROW
from tests.tiny_models import TINY_MODELS

CONFIGS = {
    "a": LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    "b": LoraConfig(r=8, alpha=8, target_modules=["q_proj", "v_proj"]),
    "c": LoraConfig(r=2, alpha=4, target_modules=["up_proj", "down_proj", "o_proj"]),
    "d": LoraConfig(r=6, alpha=6, target_modules="all-linear"),
}


def _randomise(model, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if f".{name}." in key and "lora_" in key:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def _model():
    model = TINY_MODELS["llama"].build()
    peft = get_peft_model(model, CONFIGS["a"], adapter_name="a")
    for name, config in CONFIGS.items():
        if name != "a":
            peft.add_adapter(name, config)
    for seed, name in enumerate(CONFIGS):
        _randomise(peft, name, seed)
    return peft.eval()


def _alone(model, name: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` (rows, tokens) through adapter ``name`` by itself, the ordinary path."""
    if name == BASE_ROW:
        with model.disable_adapter():
            return model(input_ids=ids).logits
    model.set_adapter(name)
    return model(input_ids=ids).logits


def _check(model, rows: list[str], ids: torch.Tensor) -> None:
    mixed = model(input_ids=ids, adapter_names=rows).logits
    for name in set(rows):
        picked = [i for i, row in enumerate(rows) if row == name]
        torch.testing.assert_close(mixed[picked], _alone(model, name, ids[picked]), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_one_token_per_row_equals_each_adapter_alone_as_the_batch_changes():
    model = _model()
    generator = torch.Generator().manual_seed(0)
    rows = ["a", "b", "c", "d", BASE_ROW, "a", "c", "b", "d", "a", "a", BASE_ROW, "c", "d", "b", "a"]
    for _ in range(3):  # the same composition, step after step: the kept gather is reused
        _check(model, rows, torch.randint(0, 64, (len(rows), 1), generator=generator))
    for changed in (rows[::-1], rows[:5], [*rows[:5], "d", "d"], ["b"] * 4, list(CONFIGS)):
        _check(model, changed, torch.randint(0, 64, (len(changed), 1), generator=generator))
    _check(model, rows[:6], torch.randint(0, 64, (6, 3), generator=generator))  # a prefill-shaped call too


@torch.no_grad()
def test_adapters_changed_in_place_or_replaced_under_the_same_name_are_not_served_stale():
    model = _model()
    rows = ["a", "b", "c", "d"]
    ids = torch.randint(0, 64, (4, 1), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids, adapter_names=rows).logits
    _randomise(model, "b", seed=10)  # in place: version counters move
    _check(model, rows, ids)
    model.delete_adapter("c")  # replaced: fresh parameters, version counters possibly equal to the old ones
    model.add_adapter("c", CONFIGS["c"])
    _randomise(model, "c", seed=11)
    _check(model, rows, ids)
    after = model(input_ids=ids, adapter_names=rows).logits
    assert not torch.allclose(before[1], after[1]) and not torch.allclose(before[2], after[2])
    torch.testing.assert_close(before[[0, 3]], after[[0, 3]], atol=0, rtol=0)
    model.set_scale("d", 0.5)  # the stacks hold s·B: a new scale must reach them
    _check(model, rows, ids)
    assert not torch.allclose(after[3], model(input_ids=ids, adapter_names=rows).logits[3])
