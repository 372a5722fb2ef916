"""Ordinary Hugging Face PEFT scripts run on peftkit with only their import line changed.

Each script below is written as a user of HF PEFT writes it (``from peft import ...``), checks itself with
asserts, and returns a few numbers. It runs once with ``peft`` and once with the import line pointed at
``peftkit``; the numbers that do not depend on random initialisation (parameter counts, shapes) must agree.
"""

import textwrap

import pytest
import torch

peft = pytest.importorskip("peft")

BASES = """
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, LlamaConfig
from transformers import BertForSequenceClassification, LlamaForCausalLM

def save_bases(folder):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).save_pretrained(f"{folder}/llama")
    BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48, num_labels=2)).save_pretrained(f"{folder}/bert")

ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
mask = torch.ones_like(ids)
"""

SCRIPTS = {
    "lora_classifier": """
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, AutoPeftModelForSequenceClassification

save_bases(folder)
model = AutoModelForSequenceClassification.from_pretrained(f"{folder}/bert")
config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                    target_modules=["query", "value"])
model = get_peft_model(model, config)
model.print_trainable_parameters()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
labels = torch.tensor([0, 1])
for step in range(3):
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.eval()
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=mask).logits
model.save_pretrained(f"{folder}/adapter")
base = AutoModelForSequenceClassification.from_pretrained(f"{folder}/bert")
loaded = PeftModel.from_pretrained(base, f"{folder}/adapter").eval()
auto = AutoPeftModelForSequenceClassification.from_pretrained(f"{folder}/adapter").eval()
with torch.no_grad():
    assert torch.allclose(loaded(input_ids=ids, attention_mask=mask).logits, logits, atol=1e-6)
    assert torch.allclose(auto(input_ids=ids, attention_mask=mask).logits, logits, atol=1e-6)
    merged = loaded.merge_and_unload()
    assert torch.allclose(merged(input_ids=ids, attention_mask=mask).logits, logits, atol=1e-5)
result = {"trainable": model.get_nb_trainable_parameters(), "shape": tuple(logits.shape)}
""",
    "qlora_causal_lm": """
from transformers import BitsAndBytesConfig
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

save_bases(folder)
bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(f"{folder}/llama", quantization_config=bnb_config, device_map="cpu")
model = prepare_model_for_kbit_training(model)
config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, bias="none",
                    task_type="CAUSAL_LM")
model = get_peft_model(model, config)
model.print_trainable_parameters()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
losses = []
for step in range(3):
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
assert losses[-1] < losses[0]
model.save_pretrained(f"{folder}/qlora")
base = AutoModelForCausalLM.from_pretrained(f"{folder}/llama", quantization_config=bnb_config, device_map="cpu")
loaded = PeftModel.from_pretrained(base, f"{folder}/qlora")
result = {"trainable": model.get_nb_trainable_parameters()[0], "finite": all(map(torch.isfinite, torch.tensor(losses)))}
""",
    "prompt_tuning": """
from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model

save_bases(folder)
model = AutoModelForCausalLM.from_pretrained(f"{folder}/llama")
config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
model = get_peft_model(model, config)
model.print_trainable_parameters()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model.train()
for step in range(2):
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.eval()
generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
model.save_pretrained(f"{folder}/prompt")
loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{folder}/llama"), f"{folder}/prompt")
again = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
assert torch.equal(again, generated)
result = {"trainable": model.get_nb_trainable_parameters()[0], "new_tokens": generated.shape[1] - ids.shape[1]}
""",
    "several_adapters": """
from peft import LoraConfig, PeftModel, get_peft_model

save_bases(folder)
base = AutoModelForCausalLM.from_pretrained(f"{folder}/llama")
model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False), adapter_name="first")
model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                        init_lora_weights=False))
model.eval()
with torch.no_grad():
    first = model(input_ids=ids).logits
    model.set_adapter("second")
    second = model(input_ids=ids).logits
    with model.disable_adapter():
        plain = model(input_ids=ids).logits
assert not torch.allclose(first, second) and not torch.allclose(first, plain)
model.save_pretrained(f"{folder}/several")
loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{folder}/llama"),
                                   f"{folder}/several/second", adapter_name="second")
loaded.load_adapter(f"{folder}/several/first", adapter_name="first")
loaded.set_adapter("first")
loaded.eval()
with torch.no_grad():
    assert torch.allclose(loaded(input_ids=ids).logits, first, atol=1e-6)
loaded.add_weighted_adapter(["first", "second"], [0.5, 0.5], "mix", combination_type="cat")
loaded.set_adapter("mix")
loaded.delete_adapter("second")
adapters = sorted(loaded.peft_config)
with torch.no_grad():
    mixed = loaded(input_ids=ids).logits
    merged = loaded.merge_and_unload()(input_ids=ids).logits
assert torch.allclose(merged, mixed, atol=1e-5)
result = {"adapters": adapters, "shape": tuple(mixed.shape)}
""",
}


def _run(script: str, library: str, folder) -> dict:
    source = textwrap.dedent(script)
    if library == "peftkit":
        source = source.replace("from peft import", "from peftkit import")  # the only change
    namespace = {"folder": str(folder)}
    exec(compile(BASES, "bases", "exec"), namespace)
    exec(compile(source, f"{library}-script", "exec"), namespace)
    return namespace["result"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_hf_peft_script_runs_on_peftkit_with_only_the_import_changed(name, tmp_path):
    if name == "qlora_causal_lm":
        pytest.importorskip("bitsandbytes")
    theirs = _run(SCRIPTS[name], "peft", tmp_path / "peft")
    torch.manual_seed(0)
    ours = _run(SCRIPTS[name], "peftkit", tmp_path / "peftkit")
    assert ours == theirs
