"""TRL's ``SFTTrainer`` on a peftkit model, against the same run on Hugging Face PEFT (same start adapter,
seeds and data): equal losses, and the saved adapter (HF PEFT's layout, adapter only) equal to HF PEFT's."""

from __future__ import annotations

import os

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from peftkit.integrations.trl import PeftkitSFTTrainer  # noqa: E402

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]


def _tokenizer():
    """A word-level tokenizer over WORDS, built locally (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _texts():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 10, (8,), generator=g)  # different lengths: padding and token counts matter
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (int(n),), generator=g)) for n in lengths]


def _run(trainer_class, model, out):
    args = trl.SFTConfig(
        output_dir=str(out), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=5e-2, report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", seed=7,
    )  # fmt: skip
    dataset = datasets.Dataset.from_dict({"text": _texts()})
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=_tokenizer())
    trainer.train()
    trainer.save_model(str(out / "final"))
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_sft_trainer_trains_and_saves_like_hf_peft(tmp_path):
    torch.manual_seed(3)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    peft.get_peft_model(_llama(), config).save_pretrained(tmp_path / "start")
    hf = peft.PeftModel.from_pretrained(_llama(), tmp_path / "start", is_trainable=True)
    hf_losses = _run(trl.SFTTrainer, hf, tmp_path / "hf")
    kit = peftkit.PeftModel.from_pretrained(_llama(), tmp_path / "start", is_trainable=True)
    losses = _run(PeftkitSFTTrainer, kit, tmp_path / "kit")

    assert len(losses) == 3 and losses == pytest.approx(hf_losses, rel=1e-5)
    files = set(os.listdir(tmp_path / "kit" / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    ours = load_file(tmp_path / "kit" / "final" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "hf" / "final" / "adapter_model.safetensors")
    assert set(ours) == set(theirs)
    start = load_file(tmp_path / "start" / "adapter_model.safetensors")
    assert any(not torch.equal(ours[k], start[k]) for k in ours)  # it trained
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)
    reloaded = peft.PeftModel.from_pretrained(_llama(), tmp_path / "kit" / "final")  # HF PEFT loads it
    assert reloaded.peft_config["default"].r == 4
