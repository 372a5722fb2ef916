"""One forward pass, one adapter per row: each row equals what its adapter alone gives."""

import copy

import pytest
import torch

from peftkit import BASE_ROW, AdapterError, BottleneckConfig, IA3Config, LoraConfig, get_peft_model
from tests.tiny_models import TINY_MODELS, run

SETUPS = {  # case -> (tiny model, first adapter, second adapter)
    "lora-bert-heads": (
        "bert",
        LoraConfig(
            r=4,
            init="random",
            target_modules=["query", "value", "word_embeddings"],
            modules_to_save=["classifier"],
        ),
        LoraConfig(r=2, init="random", target_modules=["key", "dense"], modules_to_save=["classifier"]),
    ),
    "lora-gpt2": (
        "gpt2",
        LoraConfig(r=4, init="random"),
        LoraConfig(r=8, init="random", target_modules=["c_fc", "wte"]),
    ),
    "lora-llama": (
        "llama",
        LoraConfig(r=4, init="random", target_modules="all-linear"),
        LoraConfig(r=2, init="random", alpha=7),
    ),
    "lora-t5": (
        "t5",
        LoraConfig(r=4, init="random"),
        LoraConfig(r=6, init="random", target_modules=["wo", "shared"]),
    ),
    "lora-mlp": (
        "mlp",
        LoraConfig(r=4, init="random", target_modules=["0"]),
        LoraConfig(r=3, init="random", target_modules=["0", "4"]),
    ),
    "ia3-gpt2": ("gpt2", IA3Config(init="random"), IA3Config(init="random")),
    "bottleneck-t5": (
        "t5",
        BottleneckConfig(bottleneck_size=4, init="random"),
        BottleneckConfig(placement="parallel", bottleneck_size=2, init="random"),
    ),
    "lora-and-ia3-llama": ("llama", LoraConfig(r=4, init="random"), IA3Config(init="random")),
}


@pytest.mark.parametrize("case", sorted(SETUPS))
def test_mixed_batch_equals_each_adapter_alone(case):
    model_name, first, second = SETUPS[case]
    tiny = TINY_MODELS[model_name]
    model = get_peft_model(tiny.build(), first, adapter_name="a")
    model.add_adapter("b", second)
    batch = tiny.batch()
    rows = ["b", BASE_ROW, "a"]
    mixed = run(model, tiny, batch, adapter_names=rows)
    singles = {"a": run(model, tiny, batch)}
    model.set_adapter("b")
    singles["b"] = run(model, tiny, batch)
    with model.disable_adapter():
        singles[BASE_ROW] = run(model, tiny, batch)
    assert not torch.allclose(singles["a"], singles["b"])
    for row, name in enumerate(rows):
        torch.testing.assert_close(mixed[row], singles[name][row], rtol=1e-5, atol=1e-6)


def test_mixed_batch_errors():
    tiny = TINY_MODELS["llama"]
    model = get_peft_model(tiny.build(), LoraConfig(r=2))
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        model(**tiny.batch(), adapter_names=["default", "nope", "default"])
    with pytest.raises(ValueError, match=r"has 2 entries but layer .* sees a batch of 3 rows"):
        model(**tiny.batch(), adapter_names=["default", "default"])
    with pytest.raises(AdapterError, match="one per row"):
        model(**tiny.batch(), adapter_names="default")
    model.add_adapter("dropped", LoraConfig(r=2, dropout=0.1))
    model.train()
    with pytest.raises(AdapterError, match=r"model.eval\(\)"):
        model(**tiny.batch(), adapter_names=["dropped"] * 3)


def test_a_mixed_batch_with_gradients_after_one_without_trains_the_adapters():
    # a pass under no_grad keeps its stacked adapter matrices for the next decode step; they carry no graph,
    # so a later pass that trains must stack the adapters again, or no gradient reaches them
    tiny = TINY_MODELS["llama"]
    model = get_peft_model(tiny.build(), LoraConfig(r=4, init="random"), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, init="random"))
    reference = copy.deepcopy(model)
    batch, rows = tiny.batch(), ["b", BASE_ROW, "a"]
    with torch.no_grad():
        run(model, tiny, batch, adapter_names=rows)
    for trained in (model, reference):  # `run` is for inference (no_grad): call the model itself
        tiny.output(trained(**batch, adapter_names=rows)).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in expected.values())
    for name, grad in expected.items():
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], grad)
