"""Adapters of several methods on the same layers: each one is, in every respect, the adapter alone.

LoRA, IA3, bottleneck adapters and prompt tuning each wrap the layers they act on; on one layer the wrappers
nest (IA3 around LoRA around ``value``), and BitFit trains the biases of the layers the others wrap. Whatever
else is loaded, and in whichever order adapters were added, loaded or deleted, an adapter's output, its file
and its keys must be those of a model that carries it alone (an ``adapter_model.safetensors`` of peftkit
``serve`` reloads an evicted adapter into whatever set of adapters is loaded then). Every check here is a
parity with the single-adapter model: outputs with the adapter active, the saved tensors, the config file.
"""

from __future__ import annotations

import importlib.util
import json
from itertools import permutations
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit import (
    BitFitConfig,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PeftModel,
    PromptTuningConfig,
    QuantizationConfig,
    quantize_model,
)
from peftkit.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from peftkit.layer import AdapterLayer
from tests.tiny_models import TINY_MODELS, TinyModel

BERT, GPT2 = TINY_MODELS["bert"], TINY_MODELS["gpt2"]
# Adapters that act on the same layers: LoRA on the linear layers (on BERT also the word embeddings), IA3 on
# keys, values and the feed-forward output (its defaults), serial bottleneck adapters after attention and
# feed-forward, parallel ones reading the feed-forward input (hooked on the LoRA-wrapped first feed-forward
# layer), BitFit on every bias (those of the wrapped layers too), prompt tuning around the (on BERT
# LoRA-wrapped) input embeddings.
CONFIGS = {
    "lora": LoraConfig(r=2, alpha=4, target_modules=["query", "value", "dense", "word_embeddings"]),
    "ia3": IA3Config(),
    "houlsby": BottleneckConfig(placement="houlsby", bottleneck_size=4),
    "parallel": BottleneckConfig(placement="parallel", bottleneck_size=4),
    "bitfit": BitFitConfig(),
    "prompt": PromptTuningConfig(num_virtual_tokens=2),
    # a second LoRA adapter, on layers the first has; one that trains its targets' biases
    "lora2": LoraConfig(r=3, target_modules=["value"]),
    "lora_bias": LoraConfig(r=2, target_modules=["value"], bias="lora_only"),
}
GPT2_CONFIGS = {**CONFIGS, "lora": LoraConfig(r=2, alpha=4, target_modules="all-linear")}  # Conv1D layers
STACKING = ("lora", "ia3", "houlsby", "parallel", "bitfit", "prompt")  # one adapter per method
SEEDS = {name: i for i, name in enumerate(CONFIGS)}


def _ids(order: tuple[str, ...]) -> str:
    return "-".join(order)


def _add(model: PeftModel, name: str, configs: dict = CONFIGS) -> None:
    """Add adapter ``name`` (its initialisation seeded) and move its tensors away from their identity start by
    seeded noise, drawn in the order of its checkpoint keys: the same values whatever else the model carries."""
    torch.manual_seed(SEEDS[name])
    model.add_adapter(name, configs[name])
    model.set_adapter(name)
    generator = torch.Generator().manual_seed(SEEDS[name])
    with torch.no_grad():
        for _, tensor in sorted(model.adapter_state_dict(name).items()):
            tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator))


def _logits(model: torch.nn.Module, tiny: TinyModel = BERT) -> torch.Tensor:
    with torch.no_grad():
        return tiny.output(model(**tiny.batch()))


class Reference:
    """Each adapter alone on a fresh base model (``tiny``, quantized to 4 bit or not): its logits and its
    saved folder."""

    def __init__(self, root: Path, tiny: TinyModel, configs: dict, quantized: bool = False) -> None:
        self.root, self.tiny, self.configs, self.quantized = root, tiny, configs, quantized
        self.base_logits = _logits(self.build(), tiny)
        self.logits: dict[str, torch.Tensor] = {}
        self.folders: dict[str, Path] = {}

    def build(self) -> torch.nn.Module:
        base = self.tiny.build()
        if self.quantized:  # 4-bit NF4 linear layers: the LoRA adapter on it is a QLoRA adapter
            quantize_model(base, QuantizationConfig(compute_dtype="float32"))
        return base

    def of(self, name: str) -> Path:
        if name not in self.folders:
            model = PeftModel(self.build(), None)
            _add(model, name, self.configs)
            self.logits[name] = _logits(model, self.tiny)
            model.save_pretrained(self.root, [name])
            self.folders[name] = self.root / name
        return self.folders[name]

    def assert_each_is_alone(self, model: PeftModel) -> None:
        """Each adapter of ``model`` active computes its logits alone, exactly; adapters off, the base's."""
        for name in model.peft_config:
            self.of(name)
            model.set_adapter(name)
            torch.testing.assert_close(_logits(model, self.tiny), self.logits[name], rtol=0, atol=0, msg=name)
        with model.disable_adapter():
            torch.testing.assert_close(_logits(model, self.tiny), self.base_logits, rtol=0, atol=0)

    def assert_base_restored(self, model: PeftModel) -> None:
        """No wrapper left, and every base tensor as on a fresh base model."""
        fresh = self.build()
        assert not any(isinstance(m, AdapterLayer) for m in model.base_model.modules())
        assert [type(m) for m in model.base_model.modules()] == [type(m) for m in fresh.modules()]
        theirs, ours = fresh.state_dict(), model.base_model.state_dict()
        assert sorted(ours) == sorted(theirs)
        for key, tensor in theirs.items():
            assert torch.equal(ours[key], tensor), key


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Reference]:
    """The single-adapter references of the tiny BERT, GPT-2, and BERT with 4-bit linear layers."""
    root = tmp_path_factory.mktemp("alone")
    found = {
        "bert": Reference(root / "bert", BERT, CONFIGS),
        "gpt2": Reference(root / "gpt2", GPT2, GPT2_CONFIGS),
    }
    if importlib.util.find_spec("bitsandbytes") is not None:
        found["bert-4bit"] = Reference(root / "bert-4bit", BERT, CONFIGS, quantized=True)
    return found


@pytest.fixture(scope="module")
def alone(references) -> Reference:
    return references["bert"]


def _assert_same_files(saved: Path, expected: Path) -> None:
    ours, theirs = load_file(saved / WEIGHTS_NAME), load_file(expected / WEIGHTS_NAME)
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
    assert json.loads((saved / CONFIG_NAME).read_text()) == json.loads((expected / CONFIG_NAME).read_text())


# --- loading into a model that carries adapters of other methods, in every order -------------------------
@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("order", list(permutations(STACKING, 2)), ids=_ids)
def test_every_pair_loaded_in_either_order_is_each_adapter_alone(order, family, references, tmp_path):
    _check_stack(order, references[family], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("order", list(permutations(STACKING, 3)), ids=_ids)
def test_every_triple_loaded_in_any_order_is_each_adapter_alone(order, family, references, tmp_path):
    _check_stack(order, references[family], tmp_path)


@pytest.mark.parametrize("order", list(permutations(("lora", "ia3", "parallel"))), ids=_ids)
def test_lora_ia3_and_bottleneck_in_any_order_are_each_adapter_alone(order, alone, tmp_path):
    _check_stack(order, alone, tmp_path)


@pytest.mark.parametrize("order", list(permutations(("lora", "ia3", "houlsby"))), ids=_ids)
def test_qlora_ia3_and_bottleneck_on_a_4bit_base_are_each_adapter_alone(order, references, tmp_path):
    if "bert-4bit" not in references:
        pytest.skip("bitsandbytes is not installed")
    _check_stack(order, references["bert-4bit"], tmp_path)


def _check_stack(order: tuple[str, ...], reference: Reference, tmp_path: Path) -> None:
    """Load the adapters saved alone in ``order``; after each load every adapter computes as alone. Saved
    again, each file equals its file saved alone. Deleted in the order loaded, the others stay as alone, and
    the last deletion gives back the base model bit for bit."""
    model = PeftModel(reference.build(), None)
    for name in order:
        model.load_adapter(reference.of(name), name)
        reference.assert_each_is_alone(model)
    model.save_pretrained(tmp_path)
    for name in order:
        _assert_same_files(tmp_path / name, reference.of(name))
    for name in order:
        model.delete_adapter(name)
        reference.assert_each_is_alone(model)
    reference.assert_base_restored(model)


# --- adding (then saving) in every order ------------------------------------------------------------------
@pytest.mark.parametrize(
    "order",
    [("lora", "ia3", "lora2"), *permutations(("lora", "ia3", "parallel", "bitfit"), 3)],
    ids=_ids,
)
def test_adapters_added_in_any_order_save_the_files_they_save_alone(order, alone, tmp_path):
    """The case users met: LoRA, then IA3, then a second LoRA adapter on the same layers, then saving; and
    every order of adding LoRA, IA3, a parallel bottleneck and BitFit. Then ``unload()`` gives back the base
    model bit for bit."""
    model = PeftModel(BERT.build(), None)
    for name in order:
        _add(model, name)
    model.save_pretrained(tmp_path)
    for name in order:
        _assert_same_files(tmp_path / name, alone.of(name))
    alone.assert_each_is_alone(model)
    alone.assert_base_restored(PeftModel(model.unload(), None))


def test_lora_only_biases_are_the_targeted_layers_under_an_ia3_wrapper(alone, tmp_path):
    """LoRA's ``bias="lora_only"`` trains the biases of its targets, also when IA3 wrapped them first, and
    saves them as with LoRA alone (under the LoRA wrapper's ``base_layer``, as HF PEFT does)."""
    model = PeftModel(BERT.build(), None)
    _add(model, "ia3")
    _add(model, "lora_bias")
    model.save_pretrained(tmp_path, ["lora_bias"])
    _assert_same_files(tmp_path / "lora_bias", alone.of("lora_bias"))
    biases = sorted(k for k in load_file(alone.of("lora_bias") / WEIGHTS_NAME) if k.endswith(".bias"))
    layer = "base_model.model.bert.encoder.layer.{}.attention.self.value"
    assert biases == [f"{layer.format(i)}.base_layer.bias" for i in (0, 1)]  # HF PEFT's key: LoRA wraps it


# --- HF PEFT reads a stacked model's LoRA and IA3 files as its own ------------------------------------------
@pytest.mark.parametrize("name", ["lora", "lora_bias", "ia3"])
def test_files_saved_beside_other_methods_are_hf_peft_files(name, alone, tmp_path):
    """Saved from a model that carries every other method too, the file loads in HF PEFT, which computes the
    adapter's logits and writes back the same keys and tensors."""
    peft = pytest.importorskip("peft")
    model = PeftModel(BERT.build(), None)
    for other in ("houlsby", "bitfit", "prompt", "lora" if name == "ia3" else "ia3"):
        model.load_adapter(alone.of(other), other)
    model.load_adapter(alone.of(name), name)
    model.save_pretrained(tmp_path / "ours", [name])
    theirs = peft.PeftModel.from_pretrained(BERT.build(), tmp_path / "ours" / name).eval()
    torch.testing.assert_close(_logits(theirs), alone.logits[name], rtol=1e-5, atol=1e-6)
    theirs.save_pretrained(tmp_path / "theirs")
    ours, hf = (
        load_file(tmp_path / "ours" / name / WEIGHTS_NAME),
        load_file(tmp_path / "theirs" / WEIGHTS_NAME),
    )
    assert sorted(ours) == sorted(hf)
    for key, tensor in hf.items():
        assert torch.equal(ours[key], tensor), key


def test_hf_peft_file_with_the_embedding_table_loads_beside_prompt_tuning(alone, tmp_path):
    """HF PEFT saves a LoRA-targeted embedding's table too (``word_embeddings.base_layer.weight``); loaded into
    a model where prompt tuning also wraps that embedding, the copy is recognised as the base table."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "word_embeddings"])
    theirs = peft.get_peft_model(BERT.build(), config)
    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    theirs.eval().save_pretrained(tmp_path, save_embedding_layers=True)
    assert "base_model.model.bert.embeddings.word_embeddings.base_layer.weight" in load_file(
        tmp_path / WEIGHTS_NAME
    )
    model = PeftModel(BERT.build(), None)
    for other in ("prompt", "ia3"):
        model.load_adapter(alone.of(other), other)
    model.load_adapter(tmp_path, "hf")
    model.set_adapter("hf")
    torch.testing.assert_close(_logits(model), _logits(theirs), rtol=1e-5, atol=1e-6)


# --- several adapters at once: mixed batches, and methods active together --------------------------------
@pytest.mark.parametrize("order", list(permutations(("lora", "ia3", "parallel"))), ids=_ids)
def test_each_row_of_a_mixed_batch_is_its_adapter_alone(order, alone):
    """``adapter_names`` (what ``peftkit serve`` batches with): each row equals that row of its adapter's
    model alone, whatever order the adapters were loaded in."""
    model = PeftModel(BERT.build(), None)
    for name in order:
        model.load_adapter(alone.of(name), name)
    rows = [*order[1:], "__base__"]  # three rows
    with torch.no_grad():
        logits = BERT.output(model(**BERT.batch(), adapter_names=rows))
    for row, name in enumerate(rows):
        expected = alone.base_logits if name == "__base__" else alone.logits[name]
        torch.testing.assert_close(logits[row], expected[row], rtol=1e-5, atol=1e-6)


MLP = TINY_MODELS["mlp"]
ON_LAYER_2 = {  # three methods on the MLP's middle layer "2" (16 -> 16)
    "lora": LoraConfig(r=2, alpha=3, target_modules=["2"], init="random"),
    "ia3": IA3Config(target_modules=["2"], init="random"),
    "serial": BottleneckConfig(placement="pfeiffer", bottleneck_size=3, target_modules=["2"], init="random"),
}


def _on_layer_2(order: tuple[str, ...]) -> PeftModel:
    model = PeftModel(MLP.build(), None)
    for name in order:
        torch.manual_seed(list(ON_LAYER_2).index(name))  # the same values in every order
        model.add_adapter(name, ON_LAYER_2[name])
    return model


@pytest.mark.parametrize("order", list(permutations(ON_LAYER_2)), ids=_ids)
def test_methods_active_together_compose_the_same_way_in_any_order(order):
    """LoRA, IA3 and a serial bottleneck adapter on one layer, active together, compute, by hand from their
    tensors, ``h = l ⊙ (W x + b + s·B A x)`` then ``h + a(h)``, whichever order they were added in: the
    wrappers nest by method (LoRA changes the weight, IA3 scales the layer so adapted, the bottleneck adapter
    reads its output)."""
    model = _on_layer_2(order)
    model.set_adapter(list(order))
    t = {  # every adapter's tensors of layer "2": lora_A.weight, ia3_l, adapter.down.weight, ...
        key.removeprefix("base_model.model.2."): tensor.detach()
        for name in order
        for key, tensor in model.adapter_state_dict(name).items()
    }
    base, x = MLP.build(), MLP.batch()["input"]
    with torch.no_grad():
        hidden = torch.relu(base[0](x))
        lora = model.peft_config["lora"].scaling * hidden @ t["lora_A.weight"].T @ t["lora_B.weight"].T
        h = (base[2](hidden) + lora) * t["ia3_l"].flatten()
        down = torch.relu(h @ t["adapter.down.weight"].T + t["adapter.down.bias"])
        h = h + down @ t["adapter.up.weight"].T + t["adapter.up.bias"]
        expected = base[4](torch.relu(h))
        torch.testing.assert_close(model(**MLP.batch()), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("active", [["lora", "ia3"], ["ia3", "lora"]], ids=_ids)
@pytest.mark.parametrize("order", [("lora", "ia3"), ("ia3", "lora")], ids=_ids)
def test_lora_and_ia3_merged_together_compute_as_unmerged(order, active):
    """Merging folds the inner wrapper first (LoRA's update, then IA3's scale of it), whatever order the
    adapters were added or named in; unmerging gives back the exact base weights."""
    model = _on_layer_2(order)
    model.set_adapter(active)
    original = MLP.build().state_dict()
    with torch.no_grad():
        unmerged = model(**MLP.batch())
        model.merge_adapter()
        torch.testing.assert_close(model(**MLP.batch()), unmerged, rtol=1e-5, atol=1e-6)
        model.unmerge_adapter()
    unloaded = model.unload().state_dict()
    assert all(torch.equal(unloaded[key], tensor) for key, tensor in original.items())
