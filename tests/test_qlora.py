"""QLoRA: NF4 storage with double quantization, LoRA on it, merging, checkpoints both ways, memory accounting."""

import math

import pytest
import torch
from torch import nn

from peftkit import (
    ConfigError,
    LoraConfig,
    PeftModel,
    QuantizationConfig,
    dequantize_model,
    get_qlora_model,
    paged_adamw_8bit,
    prepare_for_kbit_training,
    quantize_model,
    storage_report,
)
from peftkit.quantization import dequantize_weight, is_quantized_linear, quantize_linear
from tests.tiny_models import TINY_MODELS, run

bnb = pytest.importorskip("bitsandbytes")

LLAMA = TINY_MODELS["llama"]
# The 16 NF4 levels (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to [-1, 1], exact zero.
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


def _quantized_layer(out_features=256, in_features=512, bias=True, seed=0, **config):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    return linear, quantize_linear(linear, QuantizationConfig(**config))


def _qlora(tiny=LLAMA, seed=0, **lora):
    lora = {"r": 4, "alpha": 8, "init": "random", "target_modules": "all-linear", **lora}
    return get_qlora_model(tiny.build(seed), LoraConfig(**lora))


def _perturb(model, std=0.1):
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=generator).to(p.dtype))


def _hf_quantized(tiny, directory, seed=0):
    """The same tiny model saved and loaded back by transformers with BitsAndBytesConfig (NF4, double quant)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny.build(seed).save_pretrained(directory)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu")
    for module in model.modules():  # bitsandbytes' CPU inference repacking fails on layers narrower than a
        if is_quantized_linear(module):  # block (the tiny model's 32 inputs); peftkit's preparation does this
            module.support_avx512bf16_for_cpu = False
    return model.eval()


# --- NF4 storage -----------------------------------------------------------------------------------------
def test_nf4_code_book_is_the_papers():
    _, layer = _quantized_layer()
    torch.testing.assert_close(layer.weight.quant_state.code.cpu(), NF4_LEVELS)


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_error_on_gaussian_weights_is_within_the_rounding_bound(double_quant):
    """Each value lands on the nearest level of its block: |w - ŵ| <= c · (largest half gap between levels),
    c the block's absmax; double quantization stores c to 8 bits, adding at most ~1% of c."""
    linear, layer = _quantized_layer(double_quant=double_quant)
    weight = linear.weight.detach()
    restored = dequantize_weight(layer)
    assert restored.shape == weight.shape and restored.dtype == weight.dtype
    blocks = weight.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (blocks, 1)
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2  # 0.1385, between 0.7230 and 1.0
    slack = 0.01 if double_quant else 1e-6  # the scale's own 8-bit error (relative), none without DQ
    error = (restored.reshape(-1, 64) - blocks).abs()
    assert (error <= absmax * (half_gap + slack)).all()
    # and on average NF4 is near-optimal for N(0, σ): relative RMS error about 9.5% at blocks of 64
    relative = (restored - weight).norm() / weight.norm()
    assert 0.05 < relative < 0.11, relative


def test_bytes_per_quantized_parameter_from_the_stored_tensors():
    """NF4 + double-quantized scales: 4 + 8/64 + 32/(64·256) bits = 0.516 bytes, plus per-layer constants."""
    _, layer = _quantized_layer(out_features=1024, in_features=1024)
    stored = {k: v for k, v in layer.state_dict().items() if k == "weight" or k.startswith("weight.")}
    assert stored["weight"].dtype == torch.uint8 and stored["weight"].numel() == 1024 * 1024 // 2
    assert stored["weight.absmax"].dtype == torch.uint8  # the scales are 8-bit: double quantization
    total = sum(t.numel() * t.element_size() for t in stored.values())
    report = storage_report(nn.Sequential(layer))
    assert report.quantized_bytes == total and report.quantized_parameters == 1024 * 1024
    assert 0.516 <= report.bytes_per_quantized_parameter <= 0.53
    _, single = _quantized_layer(out_features=1024, in_features=1024, double_quant=False)
    assert storage_report(nn.Sequential(single)).bytes_per_quantized_parameter > 0.56  # fp32 scales: 0.5625


def test_quantize_model_keeps_head_and_embeddings_full_precision_and_is_configurable():
    model = LLAMA.build()
    paths = quantize_model(model, QuantizationConfig(exclude_modules=["down_proj"]))
    assert len(paths) == 2 * 6  # q, k, v, o, gate, up per block
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert type(model.model.embed_tokens) is nn.Embedding
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert is_quantized_linear(model.model.layers[0].mlp.up_proj)
    with pytest.raises(ConfigError, match="no full-precision linear layer"):
        quantize_model(model, QuantizationConfig(target_modules=["lm_head"]))  # the head stays full


def test_quantized_model_is_close_to_the_original_and_dequantizes_back():
    batch = LLAMA.batch()
    reference = run(LLAMA.build(), LLAMA, batch)
    model = LLAMA.build()
    quantize_model(model)
    quantized = run(model, LLAMA, batch)
    assert not torch.equal(quantized, reference)
    assert (quantized - reference).norm() / reference.norm() < 0.25  # 12 layers of ~9.5% weight error
    dequantize_model(model)
    assert not any(is_quantized_linear(m) for m in model.modules())
    torch.testing.assert_close(run(model, LLAMA, batch), quantized, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("quant_type", "int3", "`quant_type` must be one of"),
        ("blocksize", 48, "`blocksize` must be one of"),
        ("compute_dtype", "float8", "`compute_dtype` must be one of"),
        ("double_quant", "yes", "`double_quant` must be true or false"),
        ("target_modules", None, "`target_modules` must name the layers"),
    ],
)
def test_quantization_config_names_the_bad_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        QuantizationConfig(**{field: value})


# --- the QLoRA layer -------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter_dtype", [None, "bfloat16"])
def test_qlora_layer_output_is_dequantized_W_x_plus_scaled_BAx(adapter_dtype):
    from peftkit.methods.lora.quantized import LoraLinear4bit

    _, base = _quantized_layer(out_features=48, in_features=64)
    model = get_qlora_model(
        nn.Sequential(base),
        LoraConfig(r=3, alpha=6, init="random", target_modules=["0"], adapter_dtype=adapter_dtype),
    )
    layer = model.base_model[0]
    assert isinstance(layer, LoraLinear4bit)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == B.dtype == (torch.bfloat16 if adapter_dtype else torch.float32)
    x = torch.randn(2, 5, 64)
    W = dequantize_weight(base)
    update = (x.to(A.dtype) @ A.T @ B.T * 2.0).float()  # computed in the adapter's dtype
    expected = x @ W.T + base.bias + update
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_qlora_layer_gradients_are_those_of_the_dequantized_computation(bias):
    # a biased 4-bit layer on a (batch, tokens, in) input: bitsandbytes returns a view there, into which the
    # adapter's update must not be added in place (autograd refuses it; BERT-style models hit this)
    _, base = _quantized_layer(out_features=48, in_features=64, bias=bias)
    model = get_qlora_model(
        nn.Sequential(base), LoraConfig(r=3, alpha=6, init="random", target_modules=["0"])
    )
    layer = model.base_model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(2, 5, 64, requires_grad=True)
    grad = torch.randn(2, 5, 48)
    got = torch.autograd.grad(model(x), (x, A, B), grad)
    W = dequantize_weight(base)
    expected = x @ W.T + (base.bias if bias else 0) + 2.0 * (x @ A.T @ B.T)
    want = torch.autograd.grad(expected, (x, A, B), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_only_lora_parameters_change_and_the_loss_goes_down():
    model = _qlora(init="default")
    model.train()
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = LLAMA.batch()
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.base_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    # the 4-bit codes and all their statistics are among the unchanged tensors
    assert any(k.endswith("q_proj.base_layer.weight.absmax") for k in before)


def test_gradient_checkpointing_passes_gradients_to_the_adapters():
    batch = LLAMA.batch()
    grads = []
    for checkpointing in (False, True):
        model = get_qlora_model(
            LLAMA.build(),
            LoraConfig(r=4, init="random", target_modules="all-linear"),
            gradient_checkpointing=checkpointing,
        )
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append([p.grad for p in model.adapter_parameters("default")])
    assert all(g is not None for g in grads[1])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)


def test_preparation_puts_norms_in_fp32_and_enables_input_gradients():
    model = LLAMA.build().to(torch.bfloat16)
    quantize_model(model, QuantizationConfig(compute_dtype="bfloat16"))
    prepare_for_kbit_training(model)
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # not a norm: left as loaded
    assert not any(p.requires_grad for p in model.parameters())
    embedded = model.get_input_embeddings()(LLAMA.batch()["input_ids"])
    assert embedded.requires_grad
    peft_model = get_qlora_model(model, LoraConfig(r=2, target_modules="all-linear"))
    # adapters on a 4-bit base train in float32 (as in HF PEFT), whatever the compute dtype
    assert {p.dtype for p in peft_model.adapter_parameters("default")} == {torch.float32}


def test_already_quantized_model_is_used_as_is_and_a_second_quantization_refused():
    model = LLAMA.build()
    quantize_model(model)
    with pytest.raises(ConfigError, match="already 4-bit quantized"):
        get_qlora_model(model, LoraConfig(), QuantizationConfig())
    assert isinstance(get_qlora_model(model, LoraConfig(target_modules="all-linear")), PeftModel)


# --- merging ---------------------------------------------------------------------------------------------
def test_merge_and_unload_returns_full_precision_computing_the_qlora_output():
    batch = LLAMA.batch()
    model = _qlora()
    adapted = run(model, LLAMA, batch)
    plain = model.merge_and_unload()
    assert not any(is_quantized_linear(m) for m in plain.modules())
    weight = plain.model.layers[0].self_attn.q_proj.weight
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear and weight.dtype == torch.float32
    merged = run(plain, LLAMA, batch)
    # de-quantized W + ΔW in fp32: only float rounding separates it from the 4-bit model with its adapter
    assert (merged - adapted).abs().max() < 1e-5


def test_merge_adapter_requantizes_with_a_bounded_error_and_unmerges_exactly():
    batch = LLAMA.batch()
    model = _qlora(init="default")
    _perturb(model, std=0.01)  # a small update, as after training (a random init would dwarf W)
    adapted = run(model, LLAMA, batch)
    layer = model.base_model.model.layers[0].self_attn.q_proj
    codes = layer.base_layer.weight.data.clone()
    exact = dequantize_weight(layer.base_layer) + layer.delta_weight("default")  # dequant(W) + ΔW
    model.merge_adapter()
    # the merged layer holds exactly quant(dequant(W) + ΔW): one more NF4 rounding (bounded as tested above)
    reference = nn.Linear(exact.shape[1], exact.shape[0], bias=False)
    reference.weight.data = exact.detach()
    requantized = quantize_linear(reference, QuantizationConfig())
    assert torch.equal(layer.base_layer.weight.data, requantized.weight.data)
    assert torch.equal(dequantize_weight(layer.base_layer), dequantize_weight(requantized))
    merged = run(model, LLAMA, batch)
    relative = (merged - adapted).norm() / adapted.norm()
    assert 0 < relative < 0.25, relative  # of the order of the base's own quantization error
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight.data, codes)
    assert torch.equal(run(model, LLAMA, batch), adapted)


def test_unload_gives_back_the_4bit_base_untouched():
    batch = LLAMA.batch()
    base = LLAMA.build()
    quantize_model(base)
    expected = run(base, LLAMA, batch)
    model = get_qlora_model(base, LoraConfig(r=4, init="random", target_modules="all-linear"))
    plain = model.unload()
    assert is_quantized_linear(plain.model.layers[0].self_attn.q_proj)
    assert torch.equal(run(plain, LLAMA, batch), expected)


# --- checkpoints -----------------------------------------------------------------------------------------
def test_save_and_load_onto_a_quantized_base_is_exact(tmp_path):
    batch = LLAMA.batch()
    model = _qlora(init="default")
    _perturb(model)
    expected = run(model, LLAMA, batch)
    model.save_pretrained(tmp_path)
    base = LLAMA.build()
    quantize_model(base)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert torch.equal(run(loaded, LLAMA, batch), expected)
    for key, tensor in model.adapter_state_dict("default").items():
        assert torch.equal(loaded.adapter_state_dict("default")[key], tensor)


def test_the_saved_adapter_is_an_ordinary_lora_adapter_for_the_full_precision_base(tmp_path):
    batch = LLAMA.batch()
    model = _qlora(init="default")
    _perturb(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(LLAMA.build(), tmp_path)  # no quantization anywhere
    for key, tensor in model.adapter_state_dict("default").items():
        assert torch.equal(loaded.adapter_state_dict("default")[key], tensor)
    # the same adapter on the unquantized base: the outputs differ only by NF4's error on the base
    relative = (run(loaded, LLAMA, batch) - run(model, LLAMA, batch)).norm() / run(model, LLAMA, batch).norm()
    assert relative < 0.25


def test_models_loaded_with_bitsandbytes_config_take_peftkit_qlora(tmp_path):
    batch = LLAMA.batch()
    hf = _hf_quantized(LLAMA, tmp_path / "base")
    ours = LLAMA.build()
    quantize_model(ours)
    # transformers quantizes the same layers with the same kernels: identical 4-bit codes and outputs
    assert torch.equal(
        hf.model.layers[1].mlp.up_proj.weight.data, ours.model.layers[1].mlp.up_proj.weight.data
    )
    assert torch.equal(run(hf, LLAMA, batch), run(ours, LLAMA, batch))
    model = get_qlora_model(hf, LoraConfig(r=4, init="random", target_modules="all-linear"))
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in model.adapter_parameters("default"))


peft = pytest.importorskip("peft")


def test_peftkit_qlora_adapter_loads_in_hf_peft_on_quantized_and_full_bases(tmp_path):
    batch = LLAMA.batch()
    model = _qlora(init="default")
    _perturb(model)
    expected = run(model, LLAMA, batch)
    model.save_pretrained(tmp_path / "adapter")
    on_4bit = peft.PeftModel.from_pretrained(_hf_quantized(LLAMA, tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(run(on_4bit.eval(), LLAMA, batch), expected, rtol=1e-6, atol=1e-6)
    on_full = peft.PeftModel.from_pretrained(LLAMA.build(), tmp_path / "adapter").eval()
    ours_full = PeftModel.from_pretrained(LLAMA.build(), tmp_path / "adapter")
    assert torch.equal(run(on_full, LLAMA, batch), run(ours_full, LLAMA, batch))


def test_hf_peft_qlora_adapter_loads_in_peftkit_on_a_quantized_base(tmp_path):
    batch = LLAMA.batch()
    theirs = peft.get_peft_model(
        _hf_quantized(LLAMA, tmp_path / "base"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    _perturb(theirs)
    expected = run(theirs.eval(), LLAMA, batch)
    theirs.save_pretrained(tmp_path / "adapter")
    base = LLAMA.build()
    quantize_model(base)
    ours = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(run(ours, LLAMA, batch), expected, rtol=1e-6, atol=1e-6)


# --- optimizer -------------------------------------------------------------------------------------------
def test_paged_adamw_8bit_is_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        paged_adamw_8bit([nn.Parameter(torch.zeros(4))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="paged 8-bit AdamW needs a CUDA GPU")
def test_paged_adamw_8bit_trains_the_adapters_on_cuda():
    model = _qlora(init="default").to("cuda")  # quantized on CPU, moved with its 4-bit codes
    model.train()
    optimizer = paged_adamw_8bit(model.adapter_parameters("default"), lr=1e-2)
    assert type(optimizer).__name__ == "PagedAdamW8bit"
    batch = {k: v.cuda() for k, v in LLAMA.batch().items()}
    losses = []
    for _ in range(5):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]


def test_accounting_counts_quantized_weights_by_their_real_shape():
    from peftkit import LoraConfig, get_qlora_model
    from tests.tiny_models import TINY_MODELS

    tiny = TINY_MODELS["llama"]
    full = sum(p.numel() for p in tiny.build().parameters())
    model = get_qlora_model(tiny.build(), LoraConfig(r=4))
    assert model.trainable_parameters().base == full
