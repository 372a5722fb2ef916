"""Adapters move between peftkit and Hugging Face PEFT in both directions with identical outputs.

Hugging Face `peft` is a test-only dependency: peftkit never imports it.
"""

import pytest
import torch

from peftkit import LoraConfig, PeftModel, get_peft_model
from tests.tiny_models import TINY_MODELS, run

peft = pytest.importorskip("peft")

CASES = {
    # name: (tiny model, peftkit config, the equivalent HF PEFT config)
    "bert-heads-biases": (
        "bert",
        dict(
            r=4,
            alpha=8,
            target_modules=["query", "value", "word_embeddings"],
            modules_to_save=["classifier"],
            bias="lora_only",
        ),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value", "word_embeddings"],
            modules_to_save=["classifier"],
            bias="lora_only",
        ),
    ),
    "bert-all-linear": (
        "bert",
        dict(r=2, alpha=4, target_modules="all-linear", bias="all"),
        dict(r=2, lora_alpha=4, target_modules="all-linear", bias="all"),
    ),
    "llama-rslora-layers": (
        "llama",
        dict(
            r=4,
            alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            use_rslora=True,
            layers_to_transform=[1],
        ),
        dict(
            r=4,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            use_rslora=True,
            layers_to_transform=[1],
            layers_pattern="layers",
        ),
    ),
    "llama-embedding-regex": (
        "llama",
        dict(r=4, alpha=8, target_modules=r".*\.(embed_tokens|o_proj)"),
        dict(r=4, lora_alpha=8, target_modules=r".*\.(embed_tokens|o_proj)"),
    ),
    "gpt2-conv1d": (
        "gpt2",
        dict(r=4, alpha=8, target_modules=["c_attn", "c_fc"]),
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    ),
    "t5": (
        "t5",
        dict(r=4, alpha=8, target_modules=["q", "v", "wo"]),
        dict(r=4, lora_alpha=8, target_modules=["q", "v", "wo"]),
    ),
}


def _perturb(model):
    """Make every trainable tensor non-trivial, as training would (B starts at zero, heads at their init)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_hf_peft(case, tmp_path):
    model_name, ours, _ = CASES[case]
    tiny = TINY_MODELS[model_name]
    model = get_peft_model(tiny.build(), LoraConfig(**ours))
    _perturb(model)
    expected = run(model, tiny, tiny.batch())
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny.build(), tmp_path).eval()
    assert torch.equal(run(theirs, tiny, tiny.batch()), expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_peft_adapter_loads_in_peftkit(case, tmp_path):
    model_name, _, theirs_config = CASES[case]
    tiny = TINY_MODELS[model_name]
    theirs = peft.get_peft_model(tiny.build(), peft.LoraConfig(**theirs_config))
    _perturb(theirs)
    theirs.eval()
    expected = run(theirs, tiny, tiny.batch())
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny.build(), tmp_path)
    assert torch.equal(run(ours, tiny, tiny.batch()), expected)


def test_hf_options_peftkit_lacks_are_refused_not_ignored(tmp_path):
    tiny = TINY_MODELS["llama"]
    theirs = peft.get_peft_model(tiny.build(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_dora"):
        PeftModel.from_pretrained(tiny.build(), tmp_path)


IA3_CASES = {
    "bert": dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
    "gpt2": dict(
        target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True
    ),
    "llama": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "t5": dict(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]),
}


@pytest.mark.parametrize("model_name", sorted(IA3_CASES))
def test_ia3_moves_between_the_libraries_both_ways(model_name, tmp_path):
    from peftkit import IA3Config

    tiny = TINY_MODELS[model_name]
    ours = get_peft_model(
        tiny.build(), IA3Config(init="random")
    )  # architecture defaults, written out resolved
    expected = run(ours, tiny, tiny.batch())
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny.build(), tmp_path / "ours").eval()
    assert torch.equal(run(theirs, tiny, tiny.batch()), expected)

    theirs = peft.get_peft_model(
        tiny.build(), peft.IA3Config(init_ia3_weights=False, **IA3_CASES[model_name])
    )
    theirs.eval()
    expected = run(theirs, tiny, tiny.batch())
    theirs.save_pretrained(tmp_path / "theirs")
    ours = PeftModel.from_pretrained(tiny.build(), tmp_path / "theirs")
    assert torch.equal(run(ours, tiny, tiny.batch()), expected)
