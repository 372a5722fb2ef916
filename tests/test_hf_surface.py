"""Hugging Face PEFT's spellings and wrapper surface on peftkit, checked against HF PEFT itself."""

import json

import pytest
import torch

from peftkit import (
    AdapterError,
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    CheckpointError,
    ConfigError,
    LoraConfig,
    PeftModel,
    TaskType,
    get_peft_model,
)
from tests.tiny_models import TINY_MODELS, run

peft = pytest.importorskip("peft")
LLAMA, BERT = TINY_MODELS["llama"], TINY_MODELS["bert"]
TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def test_hf_peft_spellings_are_aliases_of_peftkits_names():
    hf_spelled = LoraConfig(
        r=4,
        lora_alpha=16,
        lora_dropout=0.1,
        init_lora_weights=False,
        task_type=TaskType.CAUSAL_LM,
        fan_in_fan_out=True,
        target_modules=["q_proj"],
    )
    assert hf_spelled == LoraConfig(
        r=4, alpha=16, dropout=0.1, init="random", task_type="CAUSAL_LM", target_modules=["q_proj"]
    )
    assert LoraConfig(init_lora_weights="gaussian").init == "gaussian"
    assert LoraConfig(init_lora_weights=True).init == "default"
    assert TaskType.SEQ_CLS == "SEQ_CLS" == peft.TaskType.SEQ_CLS
    for bad, message in [
        (dict(alpha=2, lora_alpha=3), "give one of them"),
        (dict(init_lora_weights="pissa"), "not supported by peftkit"),
        (dict(task_type="CLASSIFY"), "`task_type` must be one of"),
        (dict(fan_in_fan_out="yes"), "`fan_in_fan_out` must be true or false"),
    ]:
        with pytest.raises(ConfigError, match=message):
            LoraConfig(**bad)


@pytest.mark.parametrize(
    "given, said",
    [
        (
            dict(lora_dropout=1.5),
            r"^`lora_dropout` \(peftkit's `dropout`\) must be a number in \[0.0, 1.0\), got 1.5$",
        ),
        (dict(lora_alpha=-1), r"^`lora_alpha` \(peftkit's `alpha`\) must be a number in \[0, inf\), got -1$"),
        (dict(dropout=1.5), r"^`dropout` must be a number"),  # peftkit's own spelling: as written
        (dict(lora_dropout=0.1, r=0), r"^`r` must be a positive integer"),  # another field: untouched
    ],
)
def test_a_bad_value_is_named_as_the_user_spelled_it(given, said):
    with pytest.raises(ConfigError, match=said):
        LoraConfig(**given)


def _saved_base(tiny, directory):
    tiny.build().save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    "tiny, config, task",
    [
        (LLAMA, dict(target_modules=TARGETS), "CAUSAL_LM"),  # task read from the model's class
        (
            BERT,
            dict(target_modules=["query", "value"], task_type="SEQ_CLS"),
            "SEQ_CLS",
        ),  # head trained, as HF
    ],
)
def test_files_carry_task_type_and_base_path_and_load_with_auto_classes_of_both_libraries(
    tiny, config, task, tmp_path
):
    base_dir = _saved_base(tiny, tmp_path / "base")
    auto = type(tiny.build()).from_pretrained(base_dir).eval()
    model = get_peft_model(auto, LoraConfig(r=4, init="random", **config))
    if task == "SEQ_CLS":  # HF PEFT's meaning of task_type=SEQ_CLS: the fresh head trains in full
        assert model.peft_config["default"].modules_to_save == ("classifier",)
        with torch.no_grad():
            model.base_model.classifier.modules_to_save["default"].weight.add_(0.5)
    model.save_pretrained(tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["task_type"] == task and written["base_model_name_or_path"] == str(base_dir)
    batch = tiny.batch()
    expected = run(model, tiny, batch)
    ours = {"CAUSAL_LM": AutoPeftModelForCausalLM, "SEQ_CLS": AutoPeftModelForSequenceClassification}[task]
    theirs = {
        "CAUSAL_LM": peft.AutoPeftModelForCausalLM,
        "SEQ_CLS": peft.AutoPeftModelForSequenceClassification,
    }
    for loaded in (
        ours.from_pretrained(tmp_path / "adapter"),
        AutoPeftModel.from_pretrained(tmp_path / "adapter"),
    ):
        assert torch.equal(run(loaded.eval(), tiny, batch), expected)
    hf = theirs[task].from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(run(hf, tiny, batch), expected, rtol=1e-6, atol=1e-6)
    # and HF PEFT's file of the same kind loads in peftkit's auto class
    hf.save_pretrained(tmp_path / "hf")
    assert torch.equal(run(ours.from_pretrained(tmp_path / "hf").eval(), tiny, batch), run(hf, tiny, batch))


def test_a_classifier_adapter_without_its_head_is_written_without_task_type(tmp_path):
    """HF PEFT would expect a trained head in a SEQ_CLS file: such a file names no task, and loads there."""
    model = get_peft_model(BERT.build(), LoraConfig(r=4, target_modules=["query"], init="random"))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None
    hf = peft.PeftModel.from_pretrained(BERT.build(), tmp_path)
    torch.testing.assert_close(
        run(hf, BERT, BERT.batch()), run(model, BERT, BERT.batch()), rtol=1e-6, atol=1e-6
    )


def test_auto_loader_never_downloads_and_checks_the_task(tmp_path):
    model = get_peft_model(LLAMA.build(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="names no `base_model_name_or_path`"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "meta-llama/x"})
    )
    with pytest.raises(CheckpointError, match="never downloads"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": str(tmp_path)})
    )
    with pytest.raises(CheckpointError, match="is a CAUSAL_LM adapter"):
        AutoPeftModelForSequenceClassification.from_pretrained(tmp_path)


def test_wrapper_attributes_have_their_hf_peft_meaning():
    base = LLAMA.build().to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=TARGETS))
    hf = peft.get_peft_model(LLAMA.build().to(torch.bfloat16), peft.LoraConfig(r=4, target_modules=TARGETS))
    assert model.device == hf.device == torch.device("cpu")
    assert model.dtype == torch.bfloat16
    assert model.get_base_model() is base and model.generation_config is base.generation_config
    assert model.get_input_embeddings() is base.get_input_embeddings()
    assert model.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    model.enable_input_require_grads()
    assert model.get_input_embeddings()(LLAMA.batch()["input_ids"]).requires_grad
    assert model.active_adapters == hf.active_adapters == ["default"]


def test_gradient_checkpointing_enable_keeps_the_adapter_gradients():
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(LLAMA.build(), LoraConfig(r=4, target_modules=TARGETS, init="random"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            assert model.is_gradient_checkpointing
        model.train()
        batch = LLAMA.batch()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append([p.grad for p in model.adapter_parameters("default")])
    assert all(g is not None for g in grads[1])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)


def test_set_scale_matches_hf_peft(tmp_path):
    model = get_peft_model(LLAMA.build(), LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="random"))
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(LLAMA.build(), tmp_path)
    batch = LLAMA.batch()
    before = run(model, LLAMA, batch)
    model.set_scale("default", 0.5)
    for module in hf.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.set_scale("default", 0.5)
    scaled = run(model, LLAMA, batch)
    assert not torch.allclose(scaled, before)
    torch.testing.assert_close(scaled, run(hf, LLAMA, batch), rtol=1e-6, atol=1e-6)
    model.set_scale("default", 1.0)
    assert torch.equal(run(model, LLAMA, batch), before)
    with pytest.raises(AdapterError, match="no adapter named"):
        model.set_scale("missing", 2.0)


def test_save_pretrained_takes_hf_peft_keywords(tmp_path):
    model = get_peft_model(LLAMA.build(), LoraConfig(r=4, target_modules=TARGETS, init="random"))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init="random"))
    model.save_pretrained(tmp_path / "none", is_main_process=False)
    assert not (tmp_path / "none").exists()
    model.save_pretrained(tmp_path / "sel", selected_adapters=["other"])
    assert (tmp_path / "sel" / "other" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "sel" / "adapter_config.json").exists()
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    batch = LLAMA.batch()
    expected = run(model, LLAMA, batch)
    assert torch.equal(
        run(PeftModel.from_pretrained(LLAMA.build(), tmp_path / "bin"), LLAMA, batch), expected
    )
    hf = peft.PeftModel.from_pretrained(LLAMA.build(), tmp_path / "bin")
    torch.testing.assert_close(run(hf, LLAMA, batch), expected, rtol=1e-6, atol=1e-6)
    # a state dict gathered elsewhere (FSDP): its values are written, not the live ones
    gathered = {k: (v + 1 if "lora_A.default" in k else v) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "sd", selected_adapters=["default"], state_dict=gathered)
    written = PeftModel.from_pretrained(LLAMA.build(), tmp_path / "sd").adapter_state_dict("default")
    live = model.adapter_state_dict("default")
    for key, tensor in written.items():
        shift = 1 if key.endswith("lora_A.weight") else 0
        assert torch.equal(tensor, live[key] + shift), key


@pytest.mark.parametrize(
    "combination, ranks, options",
    [("linear", (4, 4), {}), ("cat", (4, 2), {}), ("svd", (4, 2), {}), ("svd", (4, 2), {"svd_rank": 3})],
)
def test_add_weighted_adapter_equals_hf_peft(combination, ranks, options, tmp_path):
    model = get_peft_model(LLAMA.build(), LoraConfig(r=ranks[0], alpha=8, target_modules=TARGETS), "a")
    model.add_adapter("b", LoraConfig(r=ranks[1], alpha=4, target_modules=["q_proj", "o_proj"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.adapter_parameters("a") + model.adapter_parameters("b"):
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(LLAMA.build(), tmp_path / "a", adapter_name="a")
    hf.load_adapter(tmp_path / "b", adapter_name="b")
    weights = [0.7, -0.4]
    model.add_weighted_adapter(["a", "b"], weights, "ab", combination_type=combination, **options)
    hf.add_weighted_adapter(["a", "b"], weights, "ab", combination_type=combination, **options)
    model.set_adapter("ab")
    hf.set_adapter("ab")
    batch = LLAMA.batch()
    ours = run(model, LLAMA, batch)
    torch.testing.assert_close(ours, run(hf, LLAMA, batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, run(LLAMA.build(), LLAMA, batch), atol=1e-3)
    if combination == "cat":  # exact: the weighted sum of the updates, as both adapters active with scales
        model.set_scale("a", weights[0])
        model.set_scale("b", weights[1])
        model.set_adapter(["a", "b"])
        torch.testing.assert_close(run(model, LLAMA, batch), ours, rtol=1e-5, atol=1e-5)


def test_add_weighted_adapter_refuses_what_it_cannot_combine():
    model = get_peft_model(LLAMA.build(), LoraConfig(r=4, target_modules=["q_proj"]), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("c", LoraConfig(r=4, target_modules=["q_proj"], bias="all"))
    for args, message in [
        ((["a", "b"], [1, 1], "x", "linear"), "one rank"),
        ((["a", "b"], [1], "x"), "one weight per adapter"),
        ((["a", "c"], [1, 1], "x"), "cannot be combined by weights"),
        ((["a", "b"], [1, 1], "x", "ties"), "not implemented in peftkit"),
        ((["a", "zzz"], [1, 1], "x"), "no adapter named"),
    ]:
        with pytest.raises(AdapterError, match=message):
            model.add_weighted_adapter(*args)
    assert "x" not in model.peft_config


def test_merge_takes_hf_peft_keywords_safe_merge_and_adapter_names():
    model = get_peft_model(LLAMA.build(), LoraConfig(r=4, target_modules=["q_proj"], init="random"), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"], init="random"))
    batch = LLAMA.batch()
    base_logits = run(LLAMA.build(), LLAMA, batch)
    with torch.no_grad():
        model.base_model.model.layers[1].self_attn.q_proj.lora_B["a"].weight[0, 0] = float("inf")
    with pytest.raises(AdapterError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    with model.disable_adapter():  # nothing stayed merged, the base is exactly as it was
        assert torch.equal(run(model, LLAMA, batch), base_logits)
    model.set_adapter("b")
    expected = run(model, LLAMA, batch)
    model.set_adapter("a")
    merged = model.merge_and_unload(progressbar=True, adapter_names=["b"])
    torch.testing.assert_close(run(merged, LLAMA, batch), expected, rtol=1e-5, atol=1e-5)
