"""The contract every method keeps, checked over every tiny model.

- a fresh adapter leaves the output exactly unchanged;
- after optimizer steps only the method's parameters changed (every other tensor bit-identical);
- a disabled adapter reproduces the base model exactly;
- save then load reproduces the outputs exactly; the file holds only what the method trains, and the
  accounting equals the file;
- merging gives the unmerged outputs within the method's tolerance, or a clear error where it cannot merge.
"""

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open

from peftkit import (
    AdapterError,
    BitFitConfig,
    BottleneckConfig,
    ConfigError,
    FullFineTuningConfig,
    IA3Config,
    LayerTuningConfig,
    LoraConfig,
    PeftModel,
    get_peft_model,
)
from peftkit.checkpoint import WEIGHTS_NAME
from tests.tiny_models import TINY_MODELS, run


@dataclass(frozen=True)
class MethodCase:
    config: Callable  # tiny model -> config
    trains: Callable[[str], bool]  # parameter name -> whether the method trains it (before the test's check)
    merge_tolerance: float | None  # None: the method cannot merge and must say so
    reason: str  # why that tolerance
    unsupported: dict[str, str]  # tiny model -> the error it must raise instead


def _mlp(tiny, spec, default=None):
    return spec if tiny.name == "mlp" else default


CASES = {
    "lora": MethodCase(
        lambda t: LoraConfig(r=4, target_modules=t.targets),
        lambda n: ".lora_" in n,
        1e-5,
        "W0 x + s·B(A x) and (W0 + s·B A) x differ by float32 re-association",
        {},
    ),
    "ia3": MethodCase(
        lambda t: IA3Config(target_modules=_mlp(t, ("0", "2")), feedforward_modules=_mlp(t, ("2",))),
        lambda n: ".ia3_l." in n,
        1e-5,
        "l ⊙ (W x) and (diag(l) W) x differ by float32 re-association",
        {},
    ),
    "bitfit": MethodCase(
        lambda t: BitFitConfig(),
        lambda n: n.endswith(".bias"),
        0.0,
        "the trained values are the weights: merging changes nothing",
        {"llama": "has no bias parameters", "t5": "has no bias parameters"},
    ),
    "layer_tuning": MethodCase(
        lambda t: LayerTuningConfig(top_k=1),
        lambda n: re.search(r"(layer|layers|h|block)\.1\.", n) is not None,
        0.0,
        "the trained values are the weights: merging changes nothing",
        {"mlp": "no list of repeated blocks"},
    ),
    "full": MethodCase(
        lambda t: FullFineTuningConfig(),
        lambda n: True,
        0.0,
        "the trained values are the weights: merging changes nothing",
        {},
    ),
    "bottleneck": MethodCase(
        lambda t: BottleneckConfig(
            placement="houlsby", bottleneck_size=4, target_modules=_mlp(t, ("0", "2"))
        ),
        lambda n: ".adapters." in n,
        None,
        "a non-linear adapter cannot fold into the weights",
        {},
    ),
    "parallel_adapter": MethodCase(
        lambda t: BottleneckConfig(placement="parallel", bottleneck_size=4, scaling=4.0),
        lambda n: ".adapters." in n,
        None,
        "a non-linear adapter cannot fold into the weights",
        {"mlp": "model type None has no entry in peftkit's architecture table"},
    ),
}


def _loss(model, tiny, batch):
    output = model(batch["input"]) if tiny.name == "mlp" else model(**batch).logits
    return output.pow(2).mean()


def _train(model, tiny, steps=3):
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        _loss(model, tiny, tiny.batch(seed=10 + step)).backward()
        optimizer.step()
    model.eval()


@pytest.fixture(params=sorted(CASES))
def spec(request):
    return CASES[request.param]


def test_method_contract(spec, tiny, tmp_path):
    if tiny.name in spec.unsupported:
        with pytest.raises(ConfigError, match=spec.unsupported[tiny.name]):
            get_peft_model(tiny.build(), spec.config(tiny))
        return
    batch = tiny.batch()
    reference = run(tiny.build(), tiny, batch)
    model = get_peft_model(tiny.build(), spec.config(tiny))
    assert torch.equal(run(model, tiny, batch), reference), "a fresh adapter changes nothing"

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(spec.trains(n) for n in trainable), sorted(trainable)[:5]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, tiny)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]

    adapted = run(model, tiny, batch)
    assert not torch.equal(adapted, reference)
    with model.disable_adapter():
        assert torch.equal(run(model, tiny, batch), reference), "disabled == base, exactly"

    model.save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        stored = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    count = model.trainable_parameters()
    assert count.adapter == count.trainable == sum(t.numel() for t in stored.values())
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert count.adapter_bytes == path.stat().st_size - 8 - header
    loaded = PeftModel.from_pretrained(tiny.build(), tmp_path)
    assert torch.equal(run(loaded, tiny, batch), adapted), "save/load is exact"

    if spec.merge_tolerance is None:
        with pytest.raises(AdapterError, match="cannot be merged"):
            model.merge_adapter()
    else:
        merged = run(model.merge_and_unload(), tiny, batch)
        torch.testing.assert_close(merged, adapted, rtol=spec.merge_tolerance, atol=spec.merge_tolerance)


def test_adapters_of_different_methods_live_on_one_model():
    tiny = TINY_MODELS["bert"]
    batch = tiny.batch()
    reference = run(tiny.build(), tiny, batch)
    model = get_peft_model(tiny.build(), CASES["lora"].config(tiny), adapter_name="lora")
    outputs = {}
    for method in ("lora", "ia3", "bitfit", "layer_tuning", "bottleneck", "parallel_adapter"):
        if method != "lora":
            model.add_adapter(method, CASES[method].config(tiny))
        model.set_adapter(method)
        _train(model, tiny)
        outputs[method] = run(model, tiny, batch)
    for method in reversed(list(outputs)):
        model.set_adapter(method)
        assert torch.equal(run(model, tiny, batch), outputs[method]), method
    with model.disable_adapter():
        assert torch.equal(run(model, tiny, batch), reference)
    for method in list(outputs):
        model.delete_adapter(method)
    assert torch.equal(run(model, tiny, batch), reference)
