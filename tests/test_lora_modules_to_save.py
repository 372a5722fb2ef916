"""A module both targeted and in ``modules_to_save``: the trained copy wins (HF PEFT's rule), every trainable
tensor gets a gradient, and the file loads in HF PEFT with the same logits."""

import pytest
import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

from peftkit import ConfigError, IA3Config, LoraConfig, PeftModel, get_peft_model
from peftkit.layer import AdapterLayer
from tests.tiny_models import TINY_MODELS, run

peft = pytest.importorskip("peft")
BERT = TINY_MODELS["bert"]


def _roberta(seed=0):
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        num_labels=3,
    )
    return RobertaForSequenceClassification(config).eval()


CASES = {
    # (build, peftkit config, HF PEFT config): `classifier` (BERT: a Linear; RoBERTa: a head holding `dense`
    # and `out_proj`) is both targeted and trained in full
    "bert-linear-head": (
        BERT.build,
        LoraConfig(
            r=4, alpha=8, target_modules=["query", "value", "classifier"], modules_to_save=["classifier"]
        ),
        dict(
            r=4, lora_alpha=8, target_modules=["query", "value", "classifier"], modules_to_save=["classifier"]
        ),
    ),
    "roberta-nested-head": (
        _roberta,
        LoraConfig(
            r=4, alpha=8, target_modules=["query", "dense", "out_proj"], modules_to_save=["classifier"]
        ),
        dict(
            r=4, lora_alpha=8, target_modules=["query", "dense", "out_proj"], modules_to_save=["classifier"]
        ),
    ),
}


def _train(model, steps=2):
    params = model.adapter_parameters("default")
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        model(**BERT.batch(seed=10 + step), labels=torch.tensor([0, 1, 2])).loss.backward()
        assert all(p.grad is not None for p in params)
        optimizer.step()
    # from the second step on B != 0, so every tensor, A included, has a non-zero gradient
    missing = [p.shape for p in params if not p.grad.abs().sum() > 0]
    assert not missing, f"trainable tensors without a gradient: {missing}"
    model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_trained_copy_wins_every_tensor_trains_and_hf_peft_loads_it(case, tmp_path):
    build, config, hf_config = CASES[case]
    model = get_peft_model(build(), config)
    classifier = model.base_model.classifier
    assert not any(isinstance(m, AdapterLayer) for m in classifier.original_module.modules())
    assert not any("classifier" in path for path in model._targets["default"])
    _train(model)
    batch = BERT.batch()
    expected = run(model, BERT, batch)
    model.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(build(), tmp_path)
    torch.testing.assert_close(run(hf, BERT, batch), expected, rtol=1e-6, atol=1e-6)
    # and HF PEFT's own adapter for the same config loads in peftkit with the same logits
    hf_model = peft.get_peft_model(build(), peft.LoraConfig(**hf_config, init_lora_weights=False))
    hf_model.save_pretrained(tmp_path / "hf")
    loaded = PeftModel.from_pretrained(build(), tmp_path / "hf")
    torch.testing.assert_close(run(loaded, BERT, batch), run(hf_model, BERT, batch), rtol=1e-6, atol=1e-6)


def test_targets_only_inside_modules_to_save_are_refused_with_a_message():
    for config in (
        LoraConfig(target_modules=["classifier"], modules_to_save=["classifier"]),
        IA3Config(target_modules=["classifier"], modules_to_save=["classifier"]),
    ):
        with pytest.raises(ConfigError, match="only modules inside `modules_to_save`"):
            get_peft_model(BERT.build(), config)
