"""peftkit models inside transformers' ``Trainer``, checked against the same runs with Hugging Face PEFT.

Both libraries start from the same adapter (HF PEFT's, saved and loaded into peftkit), the same seeds and
the same data; training and eval losses, and the trained adapter, must agree to float tolerance.
"""

from __future__ import annotations

import os

import peft
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

import peftkit
from peftkit.integrations import PeftkitTrainer

VOCAB, SEQ = 64, 8


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def _causal_rows(n: int = 12) -> list[dict]:
    """Rows with different numbers of counted label tokens, so that the gradient-accumulation
    normalisation (tokens of all micro-batches) differs from a mean of per-batch means; an extra text
    column that Trainer must drop."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 5] = -100  # a prompt of 1..5 tokens is not scored
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long),
                     "labels": labels, "source": f"row {i}"})  # fmt: skip
    return rows


def _classifier_rows(n: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    return [
        {"input_ids": torch.randint(3, VOCAB, (SEQ,), generator=g), "attention_mask": torch.ones(SEQ, dtype=torch.long),
         "labels": i % 3, "source": f"row {i}"}
        for i in range(n)
    ]  # fmt: skip


HF_CONFIGS = {
    "llama": lambda: peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    ),
    "bert": lambda: peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type="SEQ_CLS",
    ),
}
BUILD = {"llama": (_llama, _causal_rows), "bert": (_bert, _classifier_rows)}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The starting adapter of each model, written once by HF PEFT (nonzero B: the adapter matters)."""
    folders = {}
    for name, build in HF_CONFIGS.items():
        torch.manual_seed(3)
        model = peft.get_peft_model(BUILD[name][0](), build())
        folders[name] = tmp_path_factory.mktemp(f"start-{name}")
        model.save_pretrained(folders[name])
    return folders


def _model(library: str, name: str, start) -> torch.nn.Module:
    base = BUILD[name][0]()
    if library == "peft":
        return peft.PeftModel.from_pretrained(base, start[name], is_trainable=True)
    return peftkit.PeftModel.from_pretrained(base, start[name], is_trainable=True)


def _args(out, **overrides) -> TrainingArguments:
    """Default TrainingArguments apart from size, steps and logging (no label_names, no
    remove_unused_columns)."""
    fields = dict(
        output_dir=str(out), per_device_train_batch_size=2, per_device_eval_batch_size=4,
        gradient_accumulation_steps=2, max_steps=3, learning_rate=5e-2, logging_steps=1,
        report_to="none", save_strategy="no", seed=7, use_cpu=True,
    )  # fmt: skip
    return TrainingArguments(**{**fields, **overrides})


def _train(model, name, out, trainer_class=Trainer, **overrides):
    rows, resume = BUILD[name][1](), overrides.pop("resume", None)
    trainer = trainer_class(model=model, args=_args(out, **overrides), train_dataset=rows, eval_dataset=rows)
    trainer.train(resume_from_checkpoint=resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses, trainer.evaluate()["eval_loss"]


def _adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_plain_trainer_losses_equal_hf_peft(name, start, tmp_path):
    """Plain Trainer, default arguments, gradient accumulation: the same training and eval losses as the
    run with HF PEFT (columns kept, eval_loss reported, num_items_in_batch normalised the same way)."""
    _, hf_losses, hf_eval = _train(_model("peft", name, start), name, tmp_path / "hf")
    _, losses, eval_loss = _train(_model("peftkit", name, start), name, tmp_path / "kit")
    assert len(losses) == 3
    assert losses == pytest.approx(hf_losses, rel=1e-5, abs=1e-6)
    assert eval_loss == pytest.approx(hf_eval, rel=1e-5, abs=1e-6)
    assert losses[-1] != pytest.approx(losses[0])  # it trained


def test_untouched_adapter_eval_loss_is_the_base_models(start, tmp_path):
    """A disabled adapter's eval_loss through Trainer equals the plain base model's (the wrong
    normalisation once gave 8.574 against 10.289)."""
    rows = _causal_rows()
    base = Trainer(model=_llama(), args=_args(tmp_path / "b"), eval_dataset=rows).evaluate()["eval_loss"]
    model = peftkit.get_peft_model(_llama(), peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert Trainer(model=model, args=_args(tmp_path / "k"), eval_dataset=rows).evaluate()[
        "eval_loss"
    ] == pytest.approx(base, rel=1e-6)


def test_forward_signature_is_the_base_models(start):
    import inspect

    model = _model("peftkit", "llama", start)
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)
    assert model.accepts_loss_kwargs is True and model.loss_type == "ForCausalLM"


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_save_model_and_checkpoints_hold_only_the_adapter(name, start, tmp_path):
    """save_model() and checkpoint-N/ hold the adapter in HF PEFT's layout; both libraries load it with
    the trained model's outputs."""
    model = _model("peftkit", name, start)
    trainer, _, _ = _train(model, name, tmp_path, PeftkitTrainer, save_strategy="steps", save_steps=2)
    trainer.save_model(tmp_path / "final")
    for folder in (tmp_path / "final", tmp_path / "checkpoint-2"):
        files = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
        assert not files & {"model.safetensors", "pytorch_model.bin"}, files
    batch = {k: torch.stack([r[k] for r in _causal_rows()[:3]]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        kit = peftkit.PeftModel.from_pretrained(BUILD[name][0](), tmp_path / "final").eval()
        hf = peft.PeftModel.from_pretrained(BUILD[name][0](), tmp_path / "final").eval()
        torch.testing.assert_close(kit(**batch).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(hf(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_resume_from_checkpoint_continues_exactly(start, tmp_path):
    """Training 4 steps in one go and training 2, then resuming from checkpoint-2, end with the same
    adapter and log the same losses for steps 3 and 4."""
    whole = _model("peftkit", "llama", start)
    _, losses, _ = _train(whole, "llama", tmp_path / "a", PeftkitTrainer, max_steps=4, save_strategy="steps",
                          save_steps=2)  # fmt: skip
    resumed = _model("peftkit", "llama", start)
    _, resumed_losses, _ = _train(
        resumed,
        "llama",
        tmp_path / "b",
        PeftkitTrainer,
        max_steps=4,
        resume=str(tmp_path / "a" / "checkpoint-2"),
    )
    assert resumed_losses[-2:] == pytest.approx(losses[2:], rel=1e-6)  # the first two: from the checkpoint
    for key, value in _adapter(whole).items():
        torch.testing.assert_close(_adapter(resumed)[key], value, rtol=1e-6, atol=1e-7)


def test_gradient_checkpointing_trains_as_without(start, tmp_path):
    _, plain, _ = _train(_model("peftkit", "llama", start), "llama", tmp_path / "a")
    model = _model("peftkit", "llama", start)
    _, checkpointed, _ = _train(model, "llama", tmp_path / "b", gradient_checkpointing=True)
    assert model.base_model.is_activation_checkpointing
    assert checkpointed == pytest.approx(plain, rel=1e-5)
