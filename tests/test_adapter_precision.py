"""IA3, bottleneck adapters and AdapterFusion on half-precision bases: their tensors are float32 by default
(``adapter_dtype`` overrides), small AdamW steps are not rounded away, fp16 trains under GradScaler, outputs keep
the base's dtype, and IA3's merge / unmerge gives the original bits back."""

import pytest
import torch

from peftkit import BottleneckConfig, FusionConfig, IA3Config, get_peft_model
from tests.tiny_models import TINY_MODELS, grad_scaler_steps_change_every_tensor, run

LLAMA = TINY_MODELS["llama"]
GPT2 = TINY_MODELS["gpt2"]
CONFIGS = {
    "ia3": lambda **kw: IA3Config(**kw),
    "houlsby": lambda **kw: BottleneckConfig(placement="houlsby", bottleneck_size=4, **kw),
    "parallel": lambda **kw: BottleneckConfig(placement="parallel", bottleneck_size=4, **kw),
}


def _half(dtype, tiny=LLAMA):
    return tiny.build().to(dtype)


def _fused(dtype):
    model = get_peft_model(_half(dtype), BottleneckConfig(bottleneck_size=4, init="random"), adapter_name="a")
    model.add_adapter("b", BottleneckConfig(bottleneck_size=4, init="random"))
    model.add_adapter("fusion", FusionConfig(adapters=["a", "b"]))
    model.set_adapter("fusion")
    return model


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapters_are_float32_on_half_precision_bases_and_adapter_dtype_overrides(method, dtype):
    model = get_peft_model(_half(dtype), CONFIGS[method]())
    assert {p.dtype for p in model.adapter_parameters("default")} == {torch.float32}
    assert run(model, LLAMA, LLAMA.batch()).dtype == dtype
    model.add_adapter("in_bf16", CONFIGS[method](adapter_dtype="bfloat16"))
    assert {p.dtype for p in model.adapter_parameters("in_bf16")} == {torch.bfloat16}
    fused = _fused(dtype)
    assert {p.dtype for p in fused.adapter_parameters("fusion")} == {torch.float32}
    assert run(fused, LLAMA, LLAMA.batch()).dtype == dtype


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_five_adamw_steps_at_lr_1e4_move_nearly_every_entry_on_a_bf16_base(method):
    """IA3's vectors start near 1, where a bf16 step is 2^-7: a bf16 vector would hardly move. (Random init
    and, for bottlenecks, tanh: every entry gets a gradient from the first step, none is held by a dead ReLU.)"""
    extra = {} if method == "ia3" else {"non_linearity": "tanh"}
    model = get_peft_model(_half(torch.bfloat16), CONFIGS[method](init="random", **extra))
    params = model.adapter_parameters("default")
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    for step in range(5):
        optimizer.zero_grad()
        batch = LLAMA.batch(seed=10 + step)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
    changed = sum((p != b).sum().item() for p, b in zip(params, before, strict=True))
    assert changed / sum(b.numel() for b in before) > 0.99


@pytest.mark.parametrize("method", [*sorted(CONFIGS), "fusion"])
def test_fp16_base_trains_with_grad_scaler(method):
    model = (
        _fused(torch.float16)
        if method == "fusion"
        else get_peft_model(_half(torch.float16), CONFIGS[method]())
    )
    params = model.adapter_parameters(model.active_adapter)
    batches = [LLAMA.batch(seed=10 + step) for step in range(3)]
    assert grad_scaler_steps_change_every_tensor(model, params, batches)


@pytest.mark.parametrize("tiny", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ia3_merge_then_unmerge_restores_the_exact_weights(tiny, dtype):
    reference = _half(dtype, tiny)
    model = get_peft_model(_half(dtype, tiny), IA3Config(init="random"))
    unmerged = run(model, tiny, tiny.batch())
    model.merge_adapter()
    merged = run(model, tiny, tiny.batch())
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(merged.float(), unmerged.float(), rtol=tolerance, atol=tolerance)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.equal(run(model, tiny, tiny.batch()), run(reference, tiny, tiny.batch()))
    state = model.base_model.state_dict()
    for name, tensor in reference.state_dict().items():
        key = next(
            k
            for k in (
                name,
                name.replace("weight", "base_layer.weight"),
                name.replace("bias", "base_layer.bias"),
            )
            if k in state
        )
        assert torch.equal(state[key], tensor), name
