"""Fused linear cross-entropy: the loss and every gradient equal the ordinary loss's (logits, then
cross-entropy), on bare tensors and inside tiny transformers models with LoRA; memory stays below the logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from peftkit import LoraConfig, get_peft_model
from peftkit.config import ConfigError
from peftkit.losses import linear_cross_entropy, shift_labels
from peftkit.losses.language_model import fused_loss_unsupported, fused_training_loss
from tests.tiny_models import TINY_GQA_DECODER, TINY_MODELS, VOCAB


def _tensors(seed=0, rows=50, hidden=16, vocab=97, ignored=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).requires_grad_()
    b = torch.randn(vocab, generator=g, requires_grad=True)
    y = torch.randint(0, vocab, (rows,), generator=g)
    if ignored:
        y[::4] = -100
    return h, w, b, y


def _close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("with_bias", [True, False])
def test_loss_and_gradients_equal_cross_entropy_of_logits(reduction, smoothing, chunk_size, with_bias):
    h, w, b, y = _tensors()
    bias = b if with_bias else None
    fused = linear_cross_entropy(
        h, w, y, bias, reduction=reduction, label_smoothing=smoothing, chunk_size=chunk_size
    )
    # grad_output other than 1 must scale every gradient
    fused_grads = torch.autograd.grad(fused * 1.7, [t for t in (h, w, bias) if t is not None])
    reference = F.cross_entropy(F.linear(h, w, bias), y, reduction=reduction, label_smoothing=smoothing)
    reference_grads = torch.autograd.grad(reference * 1.7, [t for t in (h, w, bias) if t is not None])
    _close(fused, reference)
    for got, want in zip(fused_grads, reference_grads, strict=True):
        _close(got, want)
    assert fused_grads[0][y == -100].abs().sum() == 0  # ignored tokens get no gradient


def test_batched_shape_and_causal_shift_match_transformers_loss():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    from transformers.loss.loss_utils import ForCausalLMLoss

    want = ForCausalLMLoss(hidden @ weight.T, labels, vocab_size=11)
    got = linear_cross_entropy(hidden, weight, shift_labels(labels))
    _close(got, want)
    assert shift_labels(labels)[:, -1].eq(-100).all()
    assert torch.equal(shift_labels(labels)[:, :-1], labels[:, 1:])


def test_frozen_head_gets_no_gradient_and_hidden_gradient_is_exact():
    h, w, _, y = _tensors()
    w.requires_grad_(False)
    linear_cross_entropy(h, w, y).backward()
    assert w.grad is None
    want = torch.autograd.grad(F.cross_entropy(F.linear(h, w), y), h)[0]
    _close(h.grad, want)


def test_all_tokens_ignored_matches_torch():
    h, w, _, y = _tensors()
    y[:] = -100
    assert torch.isnan(linear_cross_entropy(h, w, y)) and torch.isnan(F.cross_entropy(h @ w.T, y))
    total = linear_cross_entropy(h, w, y, reduction="sum")
    total.backward()
    assert total.item() == 0.0 and h.grad.abs().sum() == 0


def test_float64_and_no_grad_paths():
    h, w, b, y = _tensors()
    h64, w64 = h.detach().double(), w.detach().double()
    _close(linear_cross_entropy(h64, w64, y), F.cross_entropy(h64 @ w64.T, y), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        _close(linear_cross_entropy(h, w, y, b), F.cross_entropy(F.linear(h, w, b), y))


def test_bf16_autocast_matches_the_ordinary_autocast_loss():
    h, w, _, y = _tensors(rows=64, hidden=32, vocab=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(h, w, y)
        fused_grads = torch.autograd.grad(fused, (h, w))
        reference = F.cross_entropy(F.linear(h, w).float(), y)
        reference_grads = torch.autograd.grad(reference, (h, w))
    assert fused.dtype == torch.float32
    assert fused_grads[0].dtype == h.dtype and fused_grads[1].dtype == w.dtype
    _close(fused, reference, rtol=1e-2, atol=1e-2)
    for got, want in zip(fused_grads, reference_grads, strict=True):
        _close(got, want, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reduction": "none"}, "reduction"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"backend": "triton"}, "backend"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, message):
    h, w, _, y = _tensors()
    with pytest.raises(ConfigError, match=message):
        linear_cross_entropy(h, w, y, **kwargs)


def test_bad_shapes_and_labels_are_refused():
    h, w, _, y = _tensors()
    with pytest.raises(ConfigError, match="weight"):
        linear_cross_entropy(h, w.T, y)
    with pytest.raises(ConfigError, match="labels"):
        linear_cross_entropy(h, w, y[:-1])
    y[1] = w.shape[0]
    with pytest.raises(ConfigError, match=r"labels must be in \[0, 97\)"):
        linear_cross_entropy(h, w, y)


def test_second_backward_is_refused_clearly():
    h, w, _, y = _tensors()
    loss = linear_cross_entropy(h, w, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


# --- inside models -----------------------------------------------------------------------------------------


def _llama(tie=False, **extra):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_GQA_DECODER, tie_word_embeddings=tie, **extra))


def _mistral():
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**TINY_GQA_DECODER))


def _qwen2():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**TINY_GQA_DECODER))


def _causal_batch(seed=5, rows=3, length=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # a padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt that is not scored
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _seq2seq_batch(seed=5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (3, 5), generator=g)
    labels[0, -2:] = -100
    return {"input_ids": torch.randint(0, VOCAB, (3, 7), generator=g), "labels": labels}


def _trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _compare_model_losses(model, batch, rtol=1e-5, atol=1e-6, autocast=False, **loss_kwargs):
    """Ordinary loss then fused loss on the same model and batch: losses and every trained gradient equal."""
    model.train()
    context = (
        torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    )
    assert fused_loss_unsupported(model) is None
    with context:
        torch.manual_seed(0)
        ordinary = model(**batch).loss
        ordinary.backward()
    want = _trainable_grads(model)
    model.zero_grad(set_to_none=True)
    with context:
        torch.manual_seed(0)
        fused = fused_training_loss(model, model, batch, **loss_kwargs)
        fused.backward()
    got = _trainable_grads(model)
    _close(fused, ordinary, rtol=rtol, atol=atol)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)
    return want


def _lora(model, init="random"):
    return get_peft_model(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", init=init))


@pytest.mark.parametrize(
    "build", [_llama, _mistral, _qwen2, TINY_MODELS["gpt2"].build], ids=["llama", "mistral", "qwen2", "gpt2"]
)
def test_lora_gradients_equal_the_ordinary_loss_in_causal_lms(build):
    model = _lora(build())
    grads = _compare_model_losses(model, _causal_batch())
    assert all("lora_" in name for name in grads)  # the frozen head got no gradient


def test_lora_gradients_equal_the_ordinary_loss_in_t5():
    model = _lora(TINY_MODELS["t5"].build())
    _compare_model_losses(model, _seq2seq_batch())


def test_trained_untied_head_and_tied_head_get_the_ordinary_gradients():
    untied = _llama(tie=False)
    grads = _compare_model_losses(untied, _causal_batch())
    assert "lm_head.weight" in grads
    tied = _llama(tie=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    grads = _compare_model_losses(tied, _causal_batch())
    # one tensor: the input-embedding gradient and the head gradient added together, as the ordinary loss does
    assert "model.embed_tokens.weight" in grads


def test_tied_t5_head_keeps_its_output_rescaling():
    model = TINY_MODELS["t5"].build()
    assert model.config.tie_word_embeddings
    _compare_model_losses(model, _seq2seq_batch())


def test_bf16_autocast_in_a_model_with_lora():
    _compare_model_losses(_lora(_llama()), _causal_batch(), rtol=2e-2, atol=2e-3, autocast=True)


def test_label_smoothing_in_a_model_equals_cross_entropy_of_its_logits():
    model = _lora(_llama())
    batch = _causal_batch()
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    want_loss = F.cross_entropy(
        logits.reshape(-1, VOCAB), shift_labels(batch["labels"]).reshape(-1), label_smoothing=0.2
    )
    want_loss.backward()
    want = _trainable_grads(model)
    model.zero_grad(set_to_none=True)
    fused_training_loss(model, model, batch, label_smoothing=0.2).backward()
    got = _trainable_grads(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_models_where_it_would_not_be_exact_are_named():
    head_adapted = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert "plain Linear" in fused_loss_unsupported(head_adapted)
    assert "bert" in fused_loss_unsupported(TINY_MODELS["bert"].build())
    from peftkit import PromptTuningConfig

    prompted = get_peft_model(_llama(), PromptTuningConfig(num_virtual_tokens=3))
    assert "changes the model's inputs" in fused_loss_unsupported(prompted)


def test_head_is_restored_after_the_loss_even_on_error():
    model = _llama()
    head = model.lm_head
    with pytest.raises(KeyError):
        fused_training_loss(model, model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    bad = _causal_batch()
    bad["input_ids"] = bad["input_ids"][:, :0]  # the forward itself fails
    with pytest.raises(Exception):  # noqa: B017 (whatever the model raises)
        fused_training_loss(model, model, bad)
    assert model.lm_head is head


# --- memory ------------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, torch.nn.functional as F
    from peftkit.losses import linear_cross_entropy

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024

    torch.manual_seed(0)
    rows, hidden, vocab = 1024, 64, 16384
    h = torch.randn(rows, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden) * 0.1
    y = torch.randint(0, vocab, (rows,))
    linear_cross_entropy(h[:8], w, y[:8]).backward()  # first-call allocations
    F.cross_entropy(h[:8] @ w.T, y[:8]).backward()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set
    before = hwm()
    if sys.argv[1] == "fused":
        linear_cross_entropy(h, w, y, chunk_size=64).backward()
    else:
        F.cross_entropy(h @ w.T, y).backward()
    print(json.dumps({"peak": hwm() - before, "logits": rows * vocab * 4}))
    """
)


def _peak(kind):
    import os

    # A fixed mmap threshold: glibc otherwise raises it as large blocks are freed and serves later ones from
    # the heap, whose pages stay resident; with it the resident set follows what is alive.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, kind], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout)


def test_peak_memory_stays_below_the_full_logits():
    fused, ordinary = _peak("fused"), _peak("ordinary")
    logits = fused["logits"]  # 64 MiB of fp32 logits for 1,024 tokens x 16,384 classes
    assert ordinary["peak"] > logits  # the measurement sees the logits when they exist
    assert fused["peak"] < logits / 4, (fused, ordinary)  # one 4 MiB chunk, not the logits


def test_qlora_gradients_equal_the_ordinary_loss():
    from peftkit import get_qlora_model

    model = get_qlora_model(_llama(), LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random"))
    grads = _compare_model_losses(model, _causal_batch())
    assert all("lora_" in name for name in grads)


# --- peftkit train ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def causal_run_assets(tmp_path_factory):
    from tests import pipeline_fixtures as fx

    root = tmp_path_factory.mktemp("causal")
    return fx.tiny_llama(root / "llama"), fx.qa_jsonl(root / "qa.jsonl", rows=80)


def _train_causal(assets, out, **overrides):
    from peftkit.training.config import TrainConfig
    from peftkit.training.loop import train

    model, data = assets
    settings = dict(
        model=str(model),
        dataset=str(data),
        task="causal-lm",
        max_steps=4,
        batch_size=8,
        learning_rate=1e-2,
        dropout=0.0,
        eval_every=4,
        save_every=4,
        eval_limit=8,
        max_length=24,
        output_dir=str(out),
        **overrides,
    )
    said = []
    result = train(TrainConfig.from_sources(None, settings), log=said.append)
    return [loss for _, loss in result.loss_curve], said


@pytest.mark.slow  # four short runs: ~30 s on a loaded 2-core machine
def test_peftkit_train_fused_and_packed_losses_equal_the_ordinary_ones(causal_run_assets, tmp_path):
    ordinary, _ = _train_causal(causal_run_assets, tmp_path / "a", fused_loss=False, group_by_length=False)
    fused, said = _train_causal(causal_run_assets, tmp_path / "b", group_by_length=False)
    packed, _ = _train_causal(causal_run_assets, tmp_path / "c", group_by_length=False, packing=True)
    assert not any("fused loss off" in line for line in said)
    assert len(ordinary) == 4
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(ordinary), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(ordinary), rtol=1e-4, atol=1e-5)
    grouped, _ = _train_causal(causal_run_assets, tmp_path / "d")  # the default: length-grouped batches
    assert grouped != fused  # other batches, same data
