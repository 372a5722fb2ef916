"""The architecture matrix: every tiny family of ``tests.tiny_models.FAMILIES`` times every method and
placement, each with its DEFAULT config, and the checks every cell must pass.

The cells, their expected refusals and the faults still known live in ``tests/test_architecture_matrix.py``;
this module holds the methods and the checks; ``tests/architecture_matrix_doc.py`` renders the tables into
``docs/architecture_matrix.md``.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from peftkit import (
    AdapterError,
    BitFitConfig,
    BottleneckConfig,
    ConfigError,
    FullFineTuningConfig,
    FusionConfig,
    IA3Config,
    LayerTuningConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    PTuningV2Config,
    get_peft_model,
    get_qlora_model,
)
from peftkit.quantization import dequantize_model, prepare_for_kbit_training, quantize_model
from tests.tiny_models import FAMILIES, TinyModel, manual_greedy, run

PEFTKIT_ERRORS = (ConfigError, AdapterError)  # what a refusal raises: peftkit's own errors, never torch's
NEW_TOKENS = 3  # generate() vs manual greedy decoding


@dataclass(frozen=True)
class Method:
    """One column of the matrix: a method or placement with its default config."""

    label: str  # the column heading in the docs
    trains: Callable[[str, nn.Module], bool]  # (parameter name, base model) -> whether the method trains it
    identity_at_init: bool  # a fresh adapter leaves the output exactly unchanged
    merge_tolerance: float | None  # None: merging is refused ("cannot be merged")
    config: Callable[[], object] | None = None  # the default config (None: `apply` builds it)
    apply: Callable[[nn.Module], PeftModel] | None = None  # how a user applies it (default: get_peft_model)
    load: Callable[[nn.Module, Path], PeftModel] | None = None  # from a saved folder onto a fresh base
    hf_peft: bool = False  # its files load in Hugging Face PEFT with the same logits
    precision: str = "float32"  # the base's: float32, bfloat16, float16, or nf4 (4-bit, by `apply`)
    tolerance: float = 1e-5  # of outputs that are equal in exact arithmetic (a padded row and the row alone)

    def build(self, family: str) -> PeftModel:
        base = fresh(family)
        if self.precision in ("bfloat16", "float16"):
            base = base.to(getattr(torch, self.precision))
        return self.apply(base) if self.apply else get_peft_model(base, self.config())

    def reload(self, family: str, directory: Path) -> PeftModel:
        base = frozen_base(family, self.precision)
        return self.load(base, directory) if self.load else PeftModel.from_pretrained(base, directory)


def frozen_base(family: str, precision: str) -> nn.Module:
    """The family's base model in ``precision``, without an adapter."""
    if precision == "nf4":
        return quantized(fresh(family))
    return fresh(family).to(getattr(torch, precision))


def quantized(base: nn.Module) -> nn.Module:
    """The base with its linear layers in 4-bit NF4 and prepared for training, as get_qlora_model does."""
    quantize_model(base)
    return prepare_for_kbit_training(base)


class Refusal(NamedTuple):
    """Why a cell is refused on purpose: texts the peftkit error raised at apply time must both contain."""

    reason: str  # what about the model makes the method pointless or impossible
    instead: str  # what to use instead

    def __str__(self) -> str:
        return f"{self.reason}; instead: {self.instead}"


def _marker(*markers: str) -> Callable[[str, nn.Module], bool]:
    return lambda name, base: any(m in name for m in markers)


def _in_top_block(name: str, base: nn.Module) -> bool:
    """Layer tuning trains the last block of a list of repeated blocks, nothing else."""
    lists = [p for p, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) >= 2]
    return any(name.startswith(f"{p}.{len(base.get_submodule(p)) - 1}.") for p in lists)


def _fusion(base: nn.Module) -> PeftModel:
    """AdapterFusion over two default bottleneck adapters (random, as if trained): only the fusion trains."""
    model = get_peft_model(base, BottleneckConfig(init="random"), adapter_name="a")
    model.add_adapter("b", BottleneckConfig(init="random"))
    model.add_adapter("fusion", FusionConfig(adapters=["a", "b"]))
    model.set_adapter("fusion")
    return model


def _load_fusion(base: nn.Module, directory: Path) -> PeftModel:
    model = PeftModel.from_pretrained(base, directory / "a", adapter_name="a")
    model.load_adapter(directory / "b", "b")
    model.load_adapter(directory / "fusion", "fusion")
    model.set_adapter("fusion")
    return model


def _bottleneck(placement: str) -> Method:
    return Method(
        f"bottleneck ({placement})",
        _marker(".adapters."),
        True,
        None,
        lambda: BottleneckConfig(placement=placement),
    )


METHODS: dict[str, Method] = {
    "lora": Method("LoRA", _marker(".lora_"), True, 1e-5, LoraConfig, hf_peft=True),
    "qlora": Method(
        "QLoRA",
        _marker(".lora_"),
        True,
        1e-4,
        apply=lambda base: get_qlora_model(base, LoraConfig()),
        hf_peft=True,
        precision="nf4",
    ),
    "lora_bf16": Method(
        "LoRA, bf16 base",
        _marker(".lora_"),
        True,
        2e-2,  # of the largest logit: W0 + ΔW rounded once to bf16, against W0 x in bf16 plus ΔW x in fp32
        LoraConfig,
        hf_peft=True,
        precision="bfloat16",
        tolerance=2e-2,
    ),
    "lora_fp16": Method(
        "LoRA, fp16 base",
        _marker(".lora_"),
        True,
        2e-3,  # of the largest logit: W0 + ΔW rounded once to fp16 (3 more mantissa bits than bf16)
        LoraConfig,
        hf_peft=True,
        precision="float16",
        tolerance=3e-3,
    ),
    "ia3": Method("IA3", _marker(".ia3_l."), True, 1e-5, IA3Config, hf_peft=True),
    "bitfit": Method("BitFit", lambda name, base: name.endswith(".bias"), True, 0.0, BitFitConfig),
    "layer_tuning": Method("layer tuning", _in_top_block, True, 0.0, LayerTuningConfig),
    "houlsby": _bottleneck("houlsby"),
    "pfeiffer": _bottleneck("pfeiffer"),
    "parallel": _bottleneck("parallel"),
    "fusion": Method("fusion", _marker(".adapters.fusion."), False, None, apply=_fusion, load=_load_fusion),
    "full": Method("full", lambda name, base: True, True, 0.0, FullFineTuningConfig),
    "prompt_tuning": Method(
        "prompt tuning", _marker("prompt_embeddings.default"), False, None, PromptTuningConfig
    ),
    "ensemble": Method(
        "prompt ensemble",
        _marker("prompt_embeddings.default"),
        False,
        None,
        lambda: PromptTuningConfig(num_prompts=2),
    ),
    "p_tuning": Method("P-tuning", _marker(".encoders.default."), False, None, PTuningConfig),
    "prefix_tuning": Method("prefix tuning", _marker(".encoders.default."), False, None, PrefixTuningConfig),
    "p_tuning_v2": Method("P-tuning v2", _marker(".encoders.default."), False, None, PTuningV2Config),
}


# --- the model of each family, built once --------------------------------------------------------------
@functools.cache
def pristine(family: str) -> nn.Module:
    return FAMILIES[family].build()


def fresh(family: str) -> nn.Module:
    """A copy of the family's tiny model (built once: copying costs a millisecond, building ten)."""
    return copy.deepcopy(pristine(family))


@functools.cache
def _reference(family: str, precision: str) -> torch.Tensor:
    """The base model's output in ``precision``, computed once per family (a 4-bit base is checked against
    its own weights dequantized first)."""
    if precision == "nf4":
        return _quantized_reference(family)
    tiny = FAMILIES[family]
    return run(frozen_base(family, precision), tiny, tiny.batch())


def _real_positions(output: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A decoder's logits without the virtual tokens that prompt methods put in front."""
    if output.dim() == 3 and output.shape[1] > like.shape[1]:
        return output[:, -like.shape[1] :]
    return output


def _train(model: PeftModel, tiny: TinyModel, steps: int = 2) -> dict[str, torch.Tensor | None]:
    """AdamW steps on a loss linear in the logits (a squared loss would drive them towards ties, where cached
    and uncached decoding may pick different tokens); returns each trainable tensor's summed |gradient|, or
    None where backward never reached it. Two steps: LoRA's A (and a bottleneck's down projection) get their
    first gradient once B (the up projection) has left zero."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(3))
    gradients: dict[str, torch.Tensor | None] = dict.fromkeys(params)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        logits = model(**tiny.batch(seed=10 + step)).logits.float()
        (logits * direction[: logits.shape[-1]]).mean().backward()
        for name, p in params.items():
            if p.grad is not None:
                total = p.grad.abs().sum()
                gradients[name] = total if gradients[name] is None else gradients[name] + total
        optimizer.step()
    model.eval()
    return gradients


# --- the checks of one cell ----------------------------------------------------------------------------
def check_refused(family: str, method_name: str, refusal: Refusal) -> None:
    """The cell is refused when the adapter is applied, by a peftkit error naming the reason and what to use
    instead (never an error from inside torch or transformers, never later)."""
    import pytest

    with pytest.raises(PEFTKIT_ERRORS, match=re.escape(refusal.reason)) as error:
        METHODS[method_name].build(family)
    assert refusal.instead in str(error.value), f"the refusal names no alternative: {error.value}"


def check_cell(family: str, method_name: str, directory: Path) -> None:
    """Every check of the issue, in the order a user meets them, on the method's default config."""
    tiny, method = FAMILIES[family], METHODS[method_name]
    batch = tiny.batch()
    reference = _reference(family, method.precision)
    model = method.build(family)
    if method.identity_at_init:
        assert torch.equal(run(model, tiny, batch), reference), "a fresh adapter must change nothing"
    _check_training(model, tiny, method)
    adapted = run(model, tiny, batch)
    moved = (_real_positions(adapted, reference) - reference).flatten(1).abs().amax(1)  # (batch,)
    assert bool((moved > 1e-6).all()), (
        f"the trained adapter leaves rows unchanged (moved by {moved.tolist()})"
    )
    with model.disable_adapter():
        assert torch.equal(run(model, tiny, batch), reference), "disable_adapter() must be the base exactly"
    if tiny.kind == "decoder":
        _check_decoding(model, tiny, method_name, method.tolerance)
    _check_save_load(model, family, method, directory, adapted)
    _check_merge(model, tiny, method, adapted, reference)


def _quantized_reference(family: str) -> torch.Tensor:
    """The 4-bit base's output, checked against the same weights dequantized to fp32 (modules a model keeps
    in fp32 must stay so: a 4-bit T5 ``wo`` computes garbage)."""
    tiny = FAMILIES[family]
    model = quantized(fresh(family))
    output = run(model, tiny, tiny.batch())
    dequantize_model(model)
    expected = run(model, tiny, tiny.batch())
    scale = expected.abs().max().item()
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-4 * scale)
    return output


def _check_training(model: PeftModel, tiny: TinyModel, method: Method) -> None:
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable, "the adapter has nothing to train"
    unexpected = sorted(n for n in trainable if not method.trains(n, model))
    assert not unexpected, f"trains what the method should not: {unexpected[:4]}"
    if method.precision != "float32":  # half-precision updates of lr-sized steps mostly round away
        low = sorted(n for n in trainable if named[n].dtype != torch.float32)
        assert not low, f"adapters on a {method.precision} base must default to fp32: {low[:4]}"
    before = {n: p.detach().clone() for n, p in named.items()}
    gradients = _train(model, tiny)
    unreached = sorted(n for n, g in gradients.items() if g is None)
    assert not unreached, f"backward never reaches {unreached[:4]}"
    moving = {n for n, g in gradients.items() if g > 0}  # zero where every unit of a ReLU is off: allowed
    changed = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert moving and changed == moving, (
        f"changed without a gradient, or not at all: {sorted(changed ^ moving)[:4]}"
    )


def _check_decoding(model: PeftModel, tiny: TinyModel, method_name: str, tolerance: float) -> None:
    """A left-padded row computes what the same row computes alone; generate() is manual greedy decoding."""
    import pytest

    from tests.tiny_models import left_padded

    batch = left_padded(tiny)  # row 0: two pad positions in front
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(**batch, position_ids=positions).logits[0, -4:]
        alone = model(input_ids=ids[:1, 2:], attention_mask=mask[:1, 2:], position_ids=positions[:1, 2:])
    torch.testing.assert_close(padded, alone.logits[0, -4:], rtol=10 * tolerance, atol=tolerance)
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    if method_name == "ensemble":  # the average of k prompts has no single next token to feed back
        with pytest.raises(PEFTKIT_ERRORS, match="ensemble"):
            model.generate(**batch, **options)
        return
    generated = model.generate(**batch, **options)
    assert torch.equal(generated, manual_greedy(model, **batch, steps=NEW_TOKENS))


def _check_save_load(model: PeftModel, family: str, method: Method, directory: Path, adapted) -> None:
    tiny = FAMILIES[family]
    model.save_pretrained(directory)
    loaded = method.reload(family, directory)
    assert torch.equal(run(loaded, tiny, tiny.batch()), adapted), "save then load must be exact"
    if method.hf_peft:
        import peft

        full = method.precision == "nf4"  # a QLoRA file is an ordinary LoRA file: compared on the fp32 base
        base = fresh(family) if full else frozen_base(family, method.precision)
        theirs = peft.PeftModel.from_pretrained(base, str(directory)).eval()
        ours = PeftModel.from_pretrained(fresh(family), directory) if full else loaded
        assert torch.equal(run(theirs, tiny, tiny.batch()), run(ours, tiny, tiny.batch())), (
            "Hugging Face PEFT must compute the same logits from the saved file"
        )


def _check_merge(model: PeftModel, tiny: TinyModel, method: Method, adapted, reference) -> None:
    """Merged equals unmerged; unmerging gives back the base's exact values; merge_and_unload() is a plain
    model computing the adapted outputs. Non-linear methods refuse to merge."""
    import pytest

    if method.merge_tolerance is None:
        with pytest.raises(AdapterError, match="cannot be merged"):
            model.merge_adapter()
        return
    scale = max(1.0, adapted.abs().max().item())  # mT5's logits reach 30: rounding error grows with them
    tolerance, atol = method.merge_tolerance, method.merge_tolerance * scale
    model.merge_adapter()
    if method.precision != "nf4":  # a 4-bit merge rounds W + ΔW to NF4 again (bounded in test_qlora.py)
        torch.testing.assert_close(run(model, tiny, tiny.batch()), adapted, rtol=tolerance, atol=atol)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.equal(run(model, tiny, tiny.batch()), reference), "unmerge must restore the base exactly"
    merged = run(model.merge_and_unload(), tiny, tiny.batch())
    torch.testing.assert_close(merged, adapted, rtol=tolerance, atol=atol)
