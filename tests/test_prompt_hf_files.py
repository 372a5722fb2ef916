"""Prompt tuning, P-tuning, prefix tuning and P-tuning v2 files in Hugging Face PEFT's own format, both ways:
a peftkit file loads in HF PEFT's ``AutoPeftModelFor...`` and an HF PEFT file in peftkit, with the same logits
(on inputs where both libraries are right: no left padding); peftkit-only variants keep peftkit's format."""

import json

import peft
import pytest
import torch
import transformers as tf

from peftkit import (
    ConfigError,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    PTuningV2Config,
    get_peft_model,
)
from tests.tiny_models import FAMILIES

N = 3
TASKS = {
    "bert": ("SEQ_CLS", tf.AutoModelForSequenceClassification, peft.AutoPeftModelForSequenceClassification)
}
TASKS["llama"] = ("CAUSAL_LM", tf.AutoModelForCausalLM, peft.AutoPeftModelForCausalLM)
OURS = {
    "prompt_tuning": lambda task: PromptTuningConfig(num_virtual_tokens=N, task_type=task),
    "p_tuning": lambda task: PTuningConfig(num_virtual_tokens=N, encoder="mlp", task_type=task),
    "prefix_tuning": lambda task: PrefixTuningConfig(num_virtual_tokens=N, projection_size=8, task_type=task),
    "p_tuning_v2": lambda task: PTuningV2Config(num_virtual_tokens=N, task_type=task),
}
THEIRS = {
    "PROMPT_TUNING": lambda task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N),
    "P_TUNING": lambda task: peft.PromptEncoderConfig(
        task_type=task, num_virtual_tokens=N, encoder_hidden_size=16
    ),
    "PREFIX_TUNING": lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N),
    "PREFIX_TUNING_MLP": lambda task: peft.PrefixTuningConfig(
        task_type=task, num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=8
    ),
}


def _base(name, tmp_path):
    """The tiny model saved and loaded back, so that files name it in `base_model_name_or_path`."""
    folder = tmp_path / f"base-{name}"
    if not folder.exists():
        FAMILIES[name].build().save_pretrained(folder)
    return TASKS[name][1].from_pretrained(folder).eval()


def _inputs(name):
    ids = torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if name == "bert":  # right padding: both libraries extend the mask the same way
        mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _moved(model):
    """Move the adapter's tensors away from their initial values (and a fresh head), so equality means
    something."""
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.5)


@pytest.mark.parametrize("method", list(OURS))
@pytest.mark.parametrize("name", list(TASKS))
def test_peftkit_file_loads_in_hf_peft_with_the_same_logits(name, method, tmp_path):
    task, _, auto = TASKS[name]
    model = get_peft_model(_base(name, tmp_path), OURS[method](task))
    _moved(model)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING"}.get(
        method, "PREFIX_TUNING"
    )
    assert written["task_type"] == task and written["base_model_name_or_path"]
    theirs = auto.from_pretrained(tmp_path / "adapter").eval()
    inputs = _inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-4)
    back = PeftModel.from_pretrained(_base(name, tmp_path), tmp_path / "adapter")
    assert back.peft_config["default"] == model.peft_config["default"], "peftkit's config reads back exactly"
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("kind", list(THEIRS))
@pytest.mark.parametrize("name", list(TASKS))
def test_hf_peft_file_loads_in_peftkit_with_the_same_logits(name, kind, tmp_path):
    task = TASKS[name][0]
    trained = peft.get_peft_model(_base(name, tmp_path), THEIRS[kind](task))
    _moved(trained)
    trained.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_base(name, tmp_path), tmp_path / "adapter").eval()
    ours = PeftModel.from_pretrained(_base(name, tmp_path), tmp_path / "adapter")
    inputs = _inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        PromptTuningConfig(num_virtual_tokens=N, num_prompts=2),
        PTuningConfig(num_virtual_tokens=1, template="[P] {x}", placeholder_token_id=5),
    ],
    ids=["ensemble", "template"],
)
def test_peftkit_only_variants_keep_peftkit_format(config, tmp_path):
    model = get_peft_model(FAMILIES["llama"].build(), config)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"].startswith("PEFTKIT_")
    back = PeftModel.from_pretrained(FAMILIES["llama"].build(), tmp_path)
    assert back.peft_config["default"] == config


def test_encoder_decoder_prefixes_keep_peftkit_format_and_hf_peft_ones_are_refused(tmp_path):
    model = get_peft_model(FAMILIES["t5"].build(), PrefixTuningConfig(num_virtual_tokens=N))
    model.save_pretrained(tmp_path / "ours")
    assert (
        json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"]
        == "PEFTKIT_PREFIX_TUNING"
    )
    PeftModel.from_pretrained(FAMILIES["t5"].build(), tmp_path / "ours")
    theirs = peft.get_peft_model(
        FAMILIES["t5"].build(), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N)
    )
    theirs.save_pretrained(tmp_path / "theirs")
    with pytest.raises(ConfigError, match="2 stacks"):
        PeftModel.from_pretrained(FAMILIES["t5"].build(), tmp_path / "theirs")
