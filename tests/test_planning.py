"""`peftkit plan`'s predictions against what peftkit actually builds and writes.

Parameter counts and adapter file sizes are predicted on a meta-device model and must equal, to the byte,
those of the same method applied to the real tiny model and saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from peftkit.method_spec import METHOD_SPECS
from peftkit.planning import Settings, parse_bytes, plan
from peftkit.planning.estimate import plan_method
from peftkit.planning.meta_model import infer_task
from peftkit.planning.sizes import nf4_weight_bytes, safetensors_file_bytes
from peftkit.tasks import TASKS
from peftkit.training.config import TrainConfig
from peftkit.training.methods import adapter_config_for, prepare_base
from tests.tiny_models import FAMILIES as ALL_FAMILIES
from tests.tiny_models import TINY_MODELS

FAMILIES = ("bert", "gpt2", "llama", "t5")
# Known gaps of planning on the meta device: peftkit's quantizer accepts an nn.Linear subclass (Falcon's) only
# after running it on a probe row, which a meta model cannot, so the plan reports QLoRA as not applicable there.
META_GAPS = {("falcon", "qlora"), ("falcon-new", "qlora")}


def _real(tiny, method: str, task: str, tmp_path):
    """The method applied by peftkit train's path to the real tiny model: (trainable, adapter params, file)."""
    from peftkit import get_peft_model

    model = tiny.build().train()
    config = TrainConfig(method=method)
    prepare_base(config, model)
    peft = get_peft_model(model, adapter_config_for(config, TASKS[task].head_modules(model)))
    peft.save_pretrained(tmp_path)
    count = peft.trainable_parameters()
    return count.trainable, count.adapter, os.path.getsize(tmp_path / "adapter_model.safetensors")


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_and_file_sizes_are_exact(family, tmp_path):
    _check_exact(TINY_MODELS[family], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(ALL_FAMILIES))
def test_counts_are_exact_and_steps_simulate_on_every_family(family, tmp_path):
    """The architecture matrix: every family's counts exact, and its LoRA training step simulated."""
    config = _check_exact(ALL_FAMILIES[family], tmp_path)
    task = "token-classification" if family.endswith("-token") else infer_task(config)
    settings = Settings(batch_size=2, max_length=8, num_labels=getattr(config, "num_labels", 2))
    row = plan_method(config, task, "lora", settings)
    assert row.applicable and row.memory.activations > 0, row.error


def _check_exact(tiny, tmp_path):
    family = tiny.name
    config = tiny.build_model().config
    task = "token-classification" if family.endswith("-token") else infer_task(config)
    settings = Settings(batch_size=2, max_length=8, num_labels=getattr(config, "num_labels", 2))
    checked = 0
    for method in METHOD_SPECS:
        predicted = plan_method(config, task, method, settings, simulate=False)
        if (family, method) in META_GAPS:
            assert not predicted.applicable  # still a gap: drop it from META_GAPS once it is closed
            continue
        if not predicted.applicable:  # e.g. BitFit on a model without biases: peftkit refuses it too
            with pytest.raises(ValueError):
                _real(tiny, method, task, tmp_path / method)
            continue
        trainable, adapter, file_bytes = _real(tiny, method, task, tmp_path / method)
        assert (predicted.trainable, predicted.adapter_parameters, predicted.adapter_file_bytes) == (
            trainable,
            adapter,
            file_bytes,
        ), method
        checked += 1
    assert checked >= 8
    return config


def test_safetensors_size_matches_the_writer_with_mixed_dtypes(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "b": torch.zeros(3, 5, dtype=torch.bfloat16),
        "a": torch.zeros(7, dtype=torch.float32),
        "c.weight": torch.zeros(2, 2, 2, dtype=torch.int64),
        "d": torch.zeros(1, dtype=torch.uint8),
    }
    metadata = {"format": "pt", "note": "x" * 13}
    save_file(tensors, tmp_path / "t.safetensors", metadata=metadata)
    meta = {k: v.to("meta") for k, v in tensors.items()}
    assert safetensors_file_bytes(meta, metadata) == os.path.getsize(tmp_path / "t.safetensors")


@pytest.mark.parametrize("shape", [(32, 48), (96, 64), (256, 300)])
def test_nf4_bytes_equal_a_real_quantized_layer(shape):
    from peftkit.quantization import QuantizationConfig, quantize_linear

    layer = quantize_linear(torch.nn.Linear(shape[1], shape[0]), QuantizationConfig())
    state = layer.weight.quant_state
    held = [layer.weight, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    assert nf4_weight_bytes(shape[0] * shape[1]) == sum(t.numel() * t.element_size() for t in held)


def test_deep_models_are_extrapolated_exactly():
    """A 12-layer model traced at 6 and 8 layers gives the trace of all 12 layers, for every kind of method."""
    from peftkit.planning import estimate

    config = TINY_MODELS["llama"].build_model().config
    config.num_hidden_layers = 12
    for fused_loss in (True, False):
        settings = Settings(batch_size=2, max_length=8, fused_loss=fused_loss)
        for method in ("lora", "full", "layer_tuning", "prompt_tuning"):
            for checkpointing in (False, True):
                direct = estimate._trace_method(config, "causal-lm", method, settings, checkpointing)
                extrapolated = estimate._layer_extrapolated(
                    config, "causal-lm", method, settings, checkpointing
                )
                assert _summary(extrapolated) == _summary(direct), (method, checkpointing, fused_loss)


def _summary(trace):
    # the inner backward stretches cut a layer's operations at other places at other depths: only their
    # maximum, the peak, is a prediction
    return (trace.activations, trace.logits, trace.gradients, trace.peak, trace.small_at_peak)


def test_the_peak_is_extrapolated_where_it_moves_with_depth():
    """Full fine-tuning of SmolLM2's shapes with the fused loss: at 6-8 layers the step peaks at the
    backward's end (every gradient, the tied embedding's among them), at 30 at its start (every layer's
    activations). One straight line through the overall peaks at 6 and 8 layers misses that by a fifth; the
    phase-by-phase extrapolation gives the 30-layer trace's peak."""
    from peftkit.planning import estimate

    config = estimate.meta_model.load_config("smollm2")
    assert config.num_hidden_layers == 30
    settings = Settings(batch_size=2, max_length=256, fused_loss=True)
    direct = estimate._trace_method(config, "causal-lm", "full", settings, False)
    extrapolated = estimate._layer_extrapolated(config, "causal-lm", "full", settings, False)
    low, high = (
        estimate._trace_method(
            estimate.meta_model.with_depth(config, d), "causal-lm", "full", settings, False
        )
        for d in estimate.TRACE_DEPTHS
    )
    depths = estimate.TRACE_DEPTHS
    one_line = low.peak + (high.peak - low.peak) * (30 - depths[0]) / (depths[1] - depths[0])
    assert extrapolated.peak == direct.peak
    assert one_line < 0.9 * direct.peak  # the case this guards: the overall maximum is not a line in depth


def test_plan_traces_the_loss_peftkit_train_uses():
    """A causal LM with a large vocabulary: with the fused loss (train's default) the plan holds no
    (tokens x vocabulary) logits; without it, their fp32 copy (less what the forward frees at its end, the
    key/value cache: a few percent here)."""
    config = TINY_MODELS["llama"].build_model().config
    config.vocab_size = 8192
    tokens, vocab_bytes = 2 * 64, 8192 * 4
    rows = {}
    for fused_loss in (True, False):
        settings = Settings(batch_size=2, max_length=64, fused_loss=fused_loss)
        rows[fused_loss] = estimate_module().plan_method(config, "causal-lm", "lora", settings)
    assert rows[False].memory.logits >= 0.9 * tokens * vocab_bytes
    assert rows[True].memory.logits < tokens * vocab_bytes / 4
    assert rows[True].memory.total < rows[False].memory.total


def estimate_module():
    from peftkit.planning import estimate

    return estimate


def test_tracer_counts_what_autograd_keeps():
    """y = x * w keeps x and w for the backward; z = y.sum() keeps nothing but its input's shape."""
    from peftkit.planning.trace import LiveBytes

    x = torch.empty(1000, device="meta", requires_grad=True)  # 4000 bytes
    with LiveBytes() as tracker:
        y = x * 2.0  # 4000 bytes, not saved by sum, x not needed (scalar multiplier)
        z = y.sum()  # 4 bytes
        del y
        assert tracker.live == 4
        z.backward()
    assert tracker.peak >= 4004 and x.grad is not None
    assert tracker.small_at_peak == tracker.peak  # every block here is below glibc's mmap threshold


def _llama_70b(tmp_path):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_a_70b_config_plans_without_weights(tmp_path):
    table = plan(model=str(_llama_70b(tmp_path)), methods=("lora",), batch_size=1, max_length=16)
    h, i, layers, vocab, kv = 8192, 28672, 80, 128256, 1024
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    assert table.base_parameters == 2 * vocab * h + layers * per_layer + h  # 70.55B, counted independently
    lora = table.row("lora")
    r = 8  # peftkit train's default rank, on every linear layer but the head
    assert lora.trainable == layers * r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))
    assert lora.adapter_file_bytes > 4 * lora.trainable  # fp32 tensors plus the header
    rotary = 2 * (h // 64 // 2) * 4  # inv_freq and original_inv_freq buffers: head_dim / 2 fp32 each
    assert lora.memory.base == 4 * table.base_parameters + rotary  # fp32 weights, as stored


def test_recommendation_follows_the_constraints(tmp_path):
    config = TINY_MODELS["bert"].build_model().config
    config.save_pretrained(tmp_path)
    prompts = ("lora", "prompt_tuning", "prefix_tuning", "p_tuning", "p_tuning_v2")
    small = {"batch_size": 2, "max_length": 8}
    tagging = plan(model=str(tmp_path), task="token-classification", methods=prompts, **small)
    assert tagging.recommendation.method == "lora"
    for method in ("prompt_tuning", "prefix_tuning", "p_tuning"):
        assert "tagging" in tagging.recommendation.ruled_out[method]
    assert "tagging" not in tagging.recommendation.ruled_out["p_tuning_v2"]
    chosen = ("lora", "bottleneck", "prompt_tuning", "p_tuning_v2", "full")
    fast = plan(model=str(tmp_path), zero_latency=True, tasks=3, methods=chosen, **small)
    for method in ("bottleneck", "prompt_tuning", "p_tuning_v2"):
        assert "latency" in fast.recommendation.ruled_out[method]
    assert "copy of the model" in fast.recommendation.ruled_out["full"]
    starved = plan(model=str(tmp_path), memory=1024, methods=("lora", "full"), **small)
    assert starved.recommendation.method is None
    assert all("more than" in why for why in starved.recommendation.ruled_out.values())


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes("512") == 512
    with pytest.raises(ValueError, match="memory must be"):
        parse_bytes("lots")


def test_cli_json_chart_and_errors(tmp_path, capsys):
    from peftkit.cli.main import main

    config = TINY_MODELS["gpt2"].build_model().config
    config.save_pretrained(tmp_path / "model")
    chart = tmp_path / "plan.png"
    args = ["plan", "--model", str(tmp_path / "model"), "--methods", "LORA", "prompt-tuning"]
    assert main([*args, "--batch-size", "2", "--max-length", "8", "--json", "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    data = json.loads(out[: out.rindex("}") + 1])
    assert [m["method"] for m in data["methods"]] == ["lora", "prompt_tuning"]
    lora, prompt = (m["memory"] for m in data["methods"])
    assert data["task"] == "causal-lm"
    assert lora["total"] > lora["base"] > 0 and prompt["total"] > prompt["base"] > 0
    assert chart.read_bytes()[:4] == b"\x89PNG"
    assert main([*args, "--memory", "plenty"]) == 2
    assert "memory must be" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path / "nowhere")]) == 2


def test_predicted_peaks_for_a_training_config(tmp_path):
    """What ``peftkit compare`` shows next to the measured peak: the plan's total for train's settings."""
    from peftkit.planning import predicted_peaks

    TINY_MODELS["bert"].build_model().config.save_pretrained(tmp_path)
    config = TrainConfig(model=str(tmp_path), dataset="rotten_tomatoes", batch_size=2, max_length=8)
    peaks = predicted_peaks(config, ["lora", "no_such_method"])
    expected = plan(model=str(tmp_path), task="sequence-classification", methods=("lora",), **_SMALL)
    assert peaks == {"lora": expected.row("lora").memory.total, "no_such_method": None}
    missing = TrainConfig(model=str(tmp_path / "nowhere"), dataset="rotten_tomatoes")
    assert predicted_peaks(missing, ["lora"]) == {"lora": None}


_SMALL = {"batch_size": 2, "max_length": 8}


def test_in_place_methods_count_the_base_values_they_keep(tmp_path):
    """Full fine-tuning keeps the pretrained values beside the trained ones (disable_adapter gives them
    back): the plan's base term is that copy, byte for byte what the real model's bank holds."""
    from peftkit import FullFineTuningConfig, get_peft_model

    model = TINY_MODELS["bert"].build_model()
    model.config.save_pretrained(tmp_path)
    labels = model.config.num_labels
    table = plan(model=str(tmp_path), methods=("full",), batch_size=2, max_length=8, num_labels=labels)
    real = get_peft_model(model, FullFineTuningConfig())
    weights = sum(p.numel() * p.element_size() for p in real.base_model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in real.base_model.buffers())  # frozen: base too
    assert real._bank.nbytes() == weights
    assert table.row("full").memory.base == weights + buffers


def test_plan_says_nothing_of_the_cache_on_stderr(tmp_path, capsys):
    """The checkpointed trace runs without a KV cache (as training does), so transformers has nothing to say
    about ``use_cache``; the model's own setting is back afterwards."""
    import logging

    from transformers.utils import logging as hf_logging

    from peftkit.cli.main import main

    config = TINY_MODELS["llama"].build_model().config
    assert config.use_cache
    config.save_pretrained(tmp_path / "model")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.warning_once.cache_clear()  # said once per process: another test may have said it already
    logging.getLogger("transformers").addHandler(handler)
    try:
        assert (
            main(["plan", "--model", str(tmp_path / "model"), "--methods", "lora", "--max-length", "8"]) == 0
        )
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    said = [r.getMessage() for r in records] + [capsys.readouterr().err]
    assert not any("incompatible with gradient checkpointing" in text for text in said), said
