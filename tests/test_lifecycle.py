"""Named adapters: add, switch, disable, delete, merge; and the errors for each misuse."""

import pytest
import torch

from peftkit import AdapterError, LoraConfig, get_peft_model
from peftkit.methods.lora import LoraLinear
from tests.tiny_models import TINY_MODELS, run

TINY = TINY_MODELS["llama"]


def _model():
    model = get_peft_model(TINY.build(), LoraConfig(r=4, init="random"))
    model.add_adapter("second", LoraConfig(r=2, init="random", target_modules=["k_proj", "up_proj"]))
    return model


def test_switching_adapters_switches_outputs():
    model = _model()
    batch = TINY.batch()
    first = run(model, TINY, batch)
    model.set_adapter("second")
    second = run(model, TINY, batch)
    assert not torch.allclose(first, second)
    model.set_adapter("default")
    assert torch.equal(run(model, TINY, batch), first)


def test_forward_returns_the_base_models_output_object():
    model = _model()
    base = TINY.build()
    ours, theirs = (
        model(**TINY.batch(), labels=TINY.batch()["input_ids"]),
        base(**TINY.batch(), labels=TINY.batch()["input_ids"]),
    )
    assert type(ours) is type(theirs) and ours.keys() == theirs.keys()


def test_delete_restores_plain_layers_where_no_adapter_is_left():
    model = _model()
    model.delete_adapter("second")
    k_proj = model.base_model.model.layers[0].self_attn.k_proj
    assert isinstance(k_proj, torch.nn.Linear) and not isinstance(k_proj, LoraLinear)
    assert list(model.peft_config) == ["default"]
    model.delete_adapter("default")
    assert model.active_adapter is None
    assert torch.equal(run(model, TINY, TINY.batch()), run(TINY.build(), TINY, TINY.batch()))


def test_merge_then_unmerge_restores_the_weights_closely():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.merge_adapter()
    model.unmerge_adapter()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (lambda m: m.add_adapter("second", LoraConfig()), "an adapter named 'second' already exists"),
        (
            lambda m: m.add_adapter("a.b", LoraConfig()),
            r"'a.b' is not a usable adapter name; allowed: .*no '\.'",
        ),
        (lambda m: m.add_adapter("__base__", LoraConfig()), "other than '__base__'"),
        (
            lambda m: m.set_adapter("third"),
            r"no adapter named 'third'; adapters on this model: \['default', 'second'\]",
        ),
        (lambda m: m.delete_adapter("third"), "no adapter named 'third'"),
        (lambda m: m.save_pretrained("/nonexistent", adapter_names=["third"]), "no adapter named 'third'"),
    ],
)
def test_misuse_gets_a_clear_error(action, message):
    with pytest.raises(AdapterError, match=message):
        action(_model())


def test_merged_state_blocks_what_would_give_wrong_answers():
    model = _model()
    model.merge_adapter()
    with pytest.raises(AdapterError, match=r"unmerge_adapter\(\) first"):
        model.set_adapter("second")
    with pytest.raises(AdapterError, match=r"unmerge_adapter\(\) first"), model.disable_adapter():
        pass
    with pytest.raises(AdapterError, match=r"unmerge_adapter\(\) first"):
        model(**TINY.batch(), adapter_names=["default"] * 3)


def test_accounting_counts_the_active_adapter():
    model = _model()
    count = model.trainable_parameters()
    hidden, layers = 32, 2
    lora_per_layer = 4 * (hidden + hidden) + 4 * (
        hidden + 16
    )  # q_proj 32->32, v_proj 32->16 (2 kv heads x 8)
    assert count.trainable == count.adapter == layers * lora_per_layer
    assert count.base == sum(p.numel() for p in TINY.build().parameters())
    assert count.trainable_percent == pytest.approx(100 * count.trainable / count.base)
    assert "trainable params" in count.summary()
