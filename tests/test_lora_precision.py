"""Half-precision bases: adapters train in float32 by default, merge / unmerge restores the exact bits."""

import pytest
import torch

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.layer import adapter_dtype
from tests.tiny_models import TINY_MODELS, grad_scaler_steps_change_every_tensor, run

LLAMA = TINY_MODELS["llama"]
CONFIG = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])


def _half(dtype, seed=0):
    return LLAMA.build(seed).to(dtype)


def _lora_A(model):
    """The linear layers' A matrices (an embedding's A starts at zero and only rows of seen tokens move)."""
    return {n: p for n, p in model.named_parameters() if "lora_A" in n}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapters_default_to_float32_on_half_precision_bases_and_adapter_dtype_overrides(dtype):
    model = get_peft_model(_half(dtype), LoraConfig(**CONFIG))
    assert {p.dtype for p in model.adapter_parameters("default")} == {torch.float32}
    assert model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == dtype
    assert run(model, LLAMA, LLAMA.batch()).dtype == dtype  # the model's outputs keep the base's dtype
    model.add_adapter("bf16", LoraConfig(**CONFIG, adapter_dtype="bfloat16"))
    assert {p.dtype for p in model.adapter_parameters("bf16")} == {torch.bfloat16}
    full = get_peft_model(LLAMA.build(), LoraConfig(**CONFIG))
    assert {p.dtype for p in full.adapter_parameters("default")} == {torch.float32}
    assert adapter_dtype(None, torch.nn.Linear(2, 2, dtype=torch.float64)) == torch.float64


def test_five_adamw_steps_at_lr_1e4_move_nearly_every_lora_A_entry_on_a_bf16_base():
    """In bf16 most lr·update steps are below half an ulp and round away (17% of entries moved before)."""
    model = get_peft_model(_half(torch.bfloat16), LoraConfig(**CONFIG))
    before = {n: p.detach().clone() for n, p in _lora_A(model).items()}
    optimizer = torch.optim.AdamW(model.adapter_parameters("default"), lr=1e-4)
    model.train()
    for step in range(5):
        optimizer.zero_grad()
        batch = LLAMA.batch(seed=10 + step)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
    changed = sum((p != before[n]).sum().item() for n, p in _lora_A(model).items())
    total = sum(p.numel() for p in before.values())
    assert changed / total > 0.99, changed / total


def test_fp16_base_trains_with_grad_scaler():
    """GradScaler refuses to unscale fp16 gradients: float32 adapters make the standard AMP recipe work."""
    model = get_peft_model(_half(torch.float16), LoraConfig(**CONFIG))
    params = model.adapter_parameters("default")
    batches = [LLAMA.batch(seed=10 + step) for step in range(3)]
    assert grad_scaler_steps_change_every_tensor(model, params, batches)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_then_unmerge_restores_the_exact_bits_and_disable_is_the_base(dtype):
    base = _half(dtype)
    original = {n: t.clone() for n, t in base.state_dict().items()}
    batch = LLAMA.batch()
    expected_base = run(_half(dtype), LLAMA, batch)
    model = get_peft_model(base, LoraConfig(**CONFIG, init="random"))
    unmerged = run(model, LLAMA, batch)
    model.merge_adapter()
    merged = run(model, LLAMA, batch)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(merged, unmerged, rtol=tolerance, atol=tolerance)
    model.unmerge_adapter()
    restored = model.unload().state_dict()
    assert all(torch.equal(restored[n], t) for n, t in original.items())
    model = get_peft_model(_half(dtype), LoraConfig(**CONFIG, init="random"))
    model.merge_adapter()
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.equal(run(model, LLAMA, batch), expected_base)


def test_bf16_logits_equal_hf_peft_with_float32_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    model = get_peft_model(_half(torch.bfloat16), LoraConfig(**CONFIG, init="random"))
    model.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(_half(torch.bfloat16), tmp_path)
    assert {p.dtype for n, p in hf.named_parameters() if "lora_" in n} == {torch.float32}
    batch = LLAMA.batch()
    torch.testing.assert_close(run(model, LLAMA, batch), run(hf, LLAMA, batch), rtol=0, atol=0)
    loaded = PeftModel.from_pretrained(_half(torch.bfloat16), tmp_path)
    assert torch.equal(run(loaded, LLAMA, batch), run(model, LLAMA, batch))
