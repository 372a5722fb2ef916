"""`peftkit compare --retain-eval`: the retained general ability (perplexity on unrelated text) of each trained
model and of the base, checked against an independent computation."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit import IA3Config, LoraConfig, PromptTuningConfig
from peftkit.config import ConfigError
from peftkit.lab import run_comparison
from peftkit.lab.retain import evaluate_retention, read_documents, retained_ability, token_windows
from peftkit.model import get_peft_model
from peftkit.prompt_tokens import expects_bos
from peftkit.training.config import TrainConfig
from tests import pipeline_fixtures as fx

GENERAL = (
    "The city council met on Tuesday to discuss the new budget for schools and roads. "
    "Officials said the plan would raise spending on public transport by a tenth next year. "
    "Residents asked questions about parking, street lights and the library opening hours. "
) * 6
LENGTH, TOKENS = 16, 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab-retain")
    text = root / "general.txt"
    text.write_text(GENERAL)
    return {"llama": fx.tiny_llama(root / "llama"), "qa": fx.qa_jsonl(root / "qa.jsonl"), "text": text}


def _model_and_windows(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets["llama"])
    model = AutoModelForCausalLM.from_pretrained(assets["llama"], dtype=torch.float32).eval()
    return model, tokenizer, token_windows([GENERAL], tokenizer, LENGTH, TOKENS)


def independent_perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean NLL) of every token after the first of each window, from the logits by hand."""
    with torch.no_grad():
        logits = model(input_ids=windows).logits  # (windows, length, vocab)
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    picked = log_probs.gather(-1, windows[:, 1:].unsqueeze(-1)).squeeze(-1)  # (windows, length - 1)
    return math.exp(-picked.mean().item())


def test_windows_are_the_text_tokenized_and_cut_in_full_windows(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets["llama"])
    ids = tokenizer(GENERAL, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = token_windows([GENERAL], tokenizer, LENGTH, TOKENS)
    assert windows.shape == (TOKENS // LENGTH, LENGTH)
    assert windows.flatten().tolist() == ids[:TOKENS]
    two = token_windows(["a b c", "d e f"] * 10, tokenizer, 4, 8)
    assert tokenizer.eos_token_id in two[0].tolist()  # documents are joined with EOS
    with pytest.raises(ConfigError, match="fewer than one window"):
        token_windows(["short"], tokenizer, 64, 64)
    with pytest.raises(ConfigError, match="--retain-length"):
        token_windows([GENERAL], tokenizer, 16, 8)


@pytest.mark.parametrize("adds_bos", [True, False])
def test_windows_start_with_bos_only_for_a_model_that_expects_one(adds_bos):
    from tests.test_train_defaults_bos import BOS, EOS, plain, word_tokenizer

    tokenizer = word_tokenizer(adds_bos)
    text = " ".join(f"w{i % 40}" for i in range(60))
    bos = tokenizer.bos_token_id if expects_bos(tokenizer) else None
    windows = token_windows([text], tokenizer, 8, 16, bos)
    ids = [*plain(text), EOS]
    assert windows.shape == (2, 8)
    if adds_bos:  # BOS, then the text continuing across windows: 7 text tokens per window
        assert windows[:, 0].tolist() == [BOS, BOS]
        assert windows[:, 1:].flatten().tolist() == ids[:14]
    else:
        assert bos is None and windows.flatten().tolist() == ids[:16]


def test_base_perplexity_equals_an_independent_computation(assets):
    model, _, windows = _model_and_windows(assets)
    result = retained_ability(model, "causal-lm", windows)
    assert result["measure"] == "perplexity" and result["tokens"] == windows.numel() - len(windows)
    assert result["perplexity"] == pytest.approx(independent_perplexity(model, windows), rel=1e-5)
    assert result["loss"] == pytest.approx(math.log(result["perplexity"]))


@pytest.mark.parametrize("config", [LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), IA3Config()])
def test_an_untrained_adapter_retains_exactly_the_base_value(assets, config):
    model, _, windows = _model_and_windows(assets)
    base = retained_ability(model, "causal-lm", windows)["perplexity"]
    adapted = get_peft_model(model, config)  # LoRA's B starts at zero, IA3's scales at one: no change
    assert retained_ability(adapted, "causal-lm", windows)["perplexity"] == base


def test_a_prompt_changes_the_value_and_is_scored_on_the_same_tokens(assets):
    model, _, windows = _model_and_windows(assets)
    base = retained_ability(model, "causal-lm", windows)
    prompted = retained_ability(
        get_peft_model(model, PromptTuningConfig(num_virtual_tokens=4)), "causal-lm", windows
    )
    assert prompted["tokens"] == base["tokens"]  # the virtual tokens are context, never scored
    assert math.isfinite(prompted["perplexity"]) and prompted["perplexity"] != base["perplexity"]


def test_encoders_are_reported_not_applicable():
    result = evaluate_retention(
        None, "sequence-classification", None, {"text": "x", "tokens": 8, "length": 4}
    )
    assert result["measure"] is None and "not applicable" in result["note"]


def test_documents_come_from_a_text_file_or_a_builtin_dataset(assets, tmp_path):
    assert read_documents(str(assets["text"])) == [GENERAL]
    with pytest.raises(ConfigError, match="built-in"):
        read_documents(str(tmp_path / "missing.txt"))


@pytest.fixture(scope="module")
def comparison(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("lab-retain-run") / "compare"
    base = TrainConfig.from_sources(
        None,
        dict(
            model=str(assets["llama"]),
            dataset=str(assets["qa"]),
            task="causal-lm",
            max_steps=2,
            batch_size=4,
            max_length=24,
            eval_every=100,
            save_every=100,
            eval_limit=4,
        ),
    )
    retain = {"text": str(assets["text"]), "tokens": TOKENS, "length": LENGTH}
    result = run_comparison(
        base,
        ["lora", "prefix_tuning"],
        [0],
        out,
        show_progress=False,
        latency_repeats=1,
        latency_batch=1,
        retain=retain,
        test_limit=4,
    )
    return out, result


@pytest.mark.slow
def test_comparison_reports_each_method_beside_the_base(assets, comparison):
    out, result = comparison
    model, _, windows = _model_and_windows(assets)
    expected = independent_perplexity(model, windows)
    assert result.retained_base["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert (
        json.loads((out / "retained_base.json").read_text())["perplexity"]
        == result.retained_base["perplexity"]
    )
    for run in result.runs:
        assert run.ok, run.error
        assert run.retained_measure == "perplexity" and math.isfinite(run.retained_value)
    markdown = (out / "results.md").read_text()
    assert f"retained perplexity (base {result.retained_base['perplexity']:.2f})" in markdown, markdown
    lora = next(r for r in result.rows if r.method == "lora")
    assert f"| {lora.retained_mean:.2f} |" in markdown, markdown
    chart = out / "retained.png"
    assert chart.read_bytes()[:4] == b"\x89PNG" and chart.stat().st_size > 5_000


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A tiny BERT checkpoint with its masked-LM head, and one without (a classifier's)."""
    from transformers import BertForMaskedLM

    root = tmp_path_factory.mktemp("lab-retain-mlm")
    with_head = fx.tiny_bert(root / "bert-mlm", BertForMaskedLM)
    return {"with_head": with_head, "without_head": fx.tiny_bert(root / "bert-cls")}


def _classifier_and_windows(folder):
    from transformers import AutoModelForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    return model, tokenizer, token_windows([GENERAL], tokenizer, LENGTH - 2, TOKENS)


def independent_mlm_loss(folder, tokenizer, windows) -> float:
    """Mean cross-entropy of the masked tokens under the checkpoint's own masked-LM model, by hand."""
    from transformers import AutoModelForMaskedLM

    from peftkit.lab.retain_mlm import masked_windows

    inputs, labels = masked_windows(windows, tokenizer)
    with torch.no_grad():
        logits = AutoModelForMaskedLM.from_pretrained(folder).eval()(input_ids=inputs).logits
    where = labels != -100
    log_probs = torch.log_softmax(logits[where].double(), dim=-1)  # (masked, vocab)
    return -log_probs.gather(-1, labels[where].unsqueeze(-1)).mean().item()


def test_encoder_masked_lm_loss_of_the_base_equals_an_independent_computation(encoders):
    from peftkit.lab.retain_mlm import encoder_mlm_ability, masked_windows

    model, tokenizer, windows = _classifier_and_windows(encoders["with_head"])
    result = encoder_mlm_ability(model, encoders["with_head"], tokenizer, windows)
    assert result["measure"] == "mlm_loss"
    assert result["tokens"] == int((masked_windows(windows, tokenizer)[1] != -100).sum()) > 0
    expected = independent_mlm_loss(encoders["with_head"], tokenizer, windows)
    assert result["mlm_loss"] == pytest.approx(expected, rel=1e-5)


def test_encoder_measure_follows_the_adapter(encoders):
    from peftkit.lab.retain_mlm import encoder_mlm_ability

    folder = encoders["with_head"]
    model, tokenizer, windows = _classifier_and_windows(folder)
    base = encoder_mlm_ability(model, folder, tokenizer, windows)["mlm_loss"]
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"]))
    assert encoder_mlm_ability(adapted, folder, tokenizer, windows)["mlm_loss"] == base  # B = 0: no change
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    assert encoder_mlm_ability(adapted, folder, tokenizer, windows)["mlm_loss"] != base  # the tuned encoder


def test_encoder_measure_is_not_applicable_without_a_head_or_with_a_prompt(encoders):
    from peftkit.lab.retain_mlm import encoder_mlm_ability

    model, tokenizer, windows = _classifier_and_windows(encoders["without_head"])
    result = encoder_mlm_ability(model, encoders["without_head"], tokenizer, windows)
    assert result["measure"] is None and "no masked-LM head" in result["note"]
    model, tokenizer, windows = _classifier_and_windows(encoders["with_head"])
    prompted = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=4))
    result = encoder_mlm_ability(prompted, encoders["with_head"], tokenizer, windows)
    assert result["measure"] is None and "inputs" in result["note"]
