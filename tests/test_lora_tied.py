"""Tied weights (GPT-2's output head shares the input embedding's table): merging LoRA into one of them must
not change the other, so the merged model computes what the unmerged one did."""

import pytest
import torch
from transformers import GPT2LMHeadModel

from peftkit import LoraConfig, get_peft_model
from peftkit.layer import innermost
from tests.tiny_models import TINY_MODELS, run

GPT2 = TINY_MODELS["gpt2"]


def _tied_model(target):
    model = get_peft_model(GPT2.build(), LoraConfig(r=4, alpha=8, target_modules=[target], init="random"))
    with torch.no_grad():  # an embedding adapter starts with A = 0: give it an effect
        for p in model.adapter_parameters("default"):
            p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("target", ["lm_head", "wte"])
def test_merging_into_a_tied_weight_changes_only_the_adapted_module(target):
    model = _tied_model(target)
    batch = GPT2.batch()
    base = GPT2.build()
    assert base.lm_head.weight is base.transformer.wte.weight
    unmerged = run(model, GPT2, batch)
    assert not torch.allclose(unmerged, run(base, GPT2, batch), atol=1e-3)  # the adapter has an effect
    model.merge_adapter()
    torch.testing.assert_close(run(model, GPT2, batch), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()  # the tie is back, with the original tensor
    backbone = model.base_model
    assert innermost(backbone.lm_head).weight is innermost(backbone.transformer.wte).weight
    assert torch.equal(backbone.transformer.wte.weight, base.transformer.wte.weight)
    torch.testing.assert_close(run(model, GPT2, batch), unmerged, rtol=0, atol=0)


@pytest.mark.parametrize("target", ["lm_head", "wte"])
def test_merge_and_unload_unties_and_the_saved_merged_model_reloads_untied(target, tmp_path):
    model = _tied_model(target)
    batch = GPT2.batch()
    unmerged = run(model, GPT2, batch)
    merged = model.merge_and_unload()
    assert type(merged.lm_head) is torch.nn.Linear and type(merged.transformer.wte) is torch.nn.Embedding
    assert merged.lm_head.weight is not merged.transformer.wte.weight
    torch.testing.assert_close(run(merged, GPT2, batch), unmerged, rtol=1e-5, atol=1e-5)
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(run(reloaded, GPT2, batch), unmerged, rtol=1e-5, atol=1e-5)


def test_merging_an_untied_target_leaves_the_config_tied():
    model = get_peft_model(GPT2.build(), LoraConfig(r=4, target_modules=["c_attn"], init="random"))
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.transformer.wte.weight
    assert merged.config.tie_word_embeddings is True
