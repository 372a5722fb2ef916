"""The architecture table: one entry per transformers ``model_type``, checked against transformers' module names.

Fragments are regexes matched at the end of a module's dotted path (``attention\\.self\\.query`` matches
``bert.encoder.layer.3.attention.self.query``). ``lora`` lists names the way Hugging Face PEFT's
``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` does (the two are kept equal by a test). The order of
the table is the order of structural matching for model types without an entry: distinctive layouts first.
"""

from __future__ import annotations

from typing import Any

from peftkit.architectures.layout import Architecture


def _falcon_cache_heads(config: Any) -> int:
    """Falcon caches every head in the new decoder layout (its grouped KV heads are broadcast before the
    cache), one shared head with multi-query attention, else ``num_kv_heads`` (transformers' FalconAttention)."""
    if getattr(config, "new_decoder_architecture", False):
        return config.num_attention_heads
    return 1 if getattr(config, "multi_query", False) else config.num_kv_heads


def _bert_like(name: str, projection: str = "{}", lora: tuple[str, ...] = ("query", "value")) -> Architecture:
    """BERT and its descendants: ``attention.self.{query,key,value}``, ``intermediate.dense``, ``output.dense``."""
    return Architecture(
        name,
        lora=lora,
        query=r"attention\.self\." + projection.format("query"),
        key=r"attention\.self\." + projection.format("key"),
        value=r"attention\.self\." + projection.format("value"),
        attention_output=r"attention\.output\.dense",
        ffn_input=r"layer\.\d+\.intermediate\.dense",
        ffn_output=r"layer\.\d+\.output\.dense",
        blocks=r"encoder\.layer",
    )


def _llama_like(
    name: str, scope: str = "", lora: tuple[str, ...] | str = ("q_proj", "v_proj")
) -> Architecture:
    """LLaMA and the decoders that share its names: ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``."""
    return Architecture(
        name,
        lora=lora,
        query=r"self_attn\.q_proj",
        key=r"self_attn\.k_proj",
        value=r"self_attn\.v_proj",
        attention_output=r"self_attn\.o_proj",
        ffn_input=r"mlp\.(?:gate_proj|up_proj)",
        ffn_output=r"mlp\.down_proj",
        blocks=r"layers",
        scope=scope,
    )


def _fused_qkv(name: str, attention: str, blocks: str, **extra: Any) -> Architecture:
    """BLOOM, Falcon, GPT-NeoX: ``{attention}.query_key_value`` / ``.dense``, ``mlp.dense_{h_to_4h,4h_to_h}``."""
    return Architecture(
        name,
        lora=("query_key_value",),
        qkv=rf"{attention}\.query_key_value",
        attention_output=rf"{attention}\.dense",
        ffn_input=r"mlp\.dense_h_to_4h",
        ffn_output=r"mlp\.dense_4h_to_h",
        blocks=blocks,
        **extra,
    )


def _separate_qkv(name: str, attention: str, output: str, ffn: tuple[str, str], blocks: str) -> Architecture:
    """Decoders with ``{attention}.{q,k,v}_proj`` and an output projection of another name (OPT, BART, GPT-J)."""
    return Architecture(
        name,
        lora=("q_proj", "v_proj"),
        query=rf"{attention}\.q_proj",
        key=rf"{attention}\.k_proj",
        value=rf"{attention}\.v_proj",
        attention_output=rf"{attention}\.{output}",
        ffn_input=ffn[0],
        ffn_output=ffn[1],
        blocks=blocks,
    )


_T5 = Architecture(
    "t5",
    lora=("q", "v"),
    query=r"(?:SelfAttention|EncDecAttention)\.q",
    key=r"(?:SelfAttention|EncDecAttention)\.k",
    value=r"(?:SelfAttention|EncDecAttention)\.v",
    attention_output=r"(?:SelfAttention|EncDecAttention)\.o",
    ffn_input=r"DenseReluDense\.wi(?:_0|_1)?",  # wi_0 / wi_1: the gated-GELU variant (T5 v1.1, mT5)
    ffn_output=r"DenseReluDense\.wo",
    blocks=r"(?:encoder|decoder)\.block",
)

_ENTRIES = [
    _bert_like("bert"),
    _bert_like("deberta-v2", projection="{}_proj", lora=("query_proj", "value_proj")),
    Architecture(
        "albert",
        lora=("query", "value"),
        query=r"attention\.query",
        key=r"attention\.key",
        value=r"attention\.value",
        attention_output=r"attention\.dense",
        ffn_input=r"albert_layers\.\d+\.ffn",
        ffn_output=r"albert_layers\.\d+\.ffn_output",
        blocks=None,
        attention_layers=lambda config: config.num_hidden_layers * config.inner_group_num,
        note="ALBERT shares one block's weights across all its layers, so there are no top blocks to train apart "
        "from the others",
    ),
    Architecture(
        "distilbert",
        lora=("q_lin", "v_lin"),
        query=r"attention\.q_lin",
        key=r"attention\.k_lin",
        value=r"attention\.v_lin",
        attention_output=r"attention\.out_lin",
        ffn_input=r"ffn\.lin1",
        ffn_output=r"ffn\.lin2",
        blocks=r"transformer\.layer",
    ),
    Architecture(
        "modernbert",
        lora=("Wqkv",),
        qkv=r"attn\.Wqkv",
        attention_output=r"attn\.Wo",
        ffn_input=r"mlp\.Wi",
        ffn_output=r"mlp\.Wo",
        blocks=r"layers",
    ),
    Architecture(
        "gpt2",
        lora=("c_attn",),
        qkv=r"attn\.c_attn",
        attention_output=r"attn\.c_proj",
        ffn_input=r"mlp\.c_fc",
        ffn_output=r"mlp\.c_proj",
        blocks=r"h",
    ),
    _fused_qkv("gpt_neox", "attention", r"layers"),
    _fused_qkv("bloom", "self_attention", r"h"),
    _fused_qkv("falcon", "self_attention", r"h", cache_heads=_falcon_cache_heads),
    Architecture(
        "phi3",
        lora=("qkv_proj",),
        qkv=r"self_attn\.qkv_proj",
        attention_output=r"self_attn\.o_proj",
        ffn_input=r"mlp\.gate_up_proj",
        ffn_output=r"mlp\.down_proj",
        blocks=r"layers",
    ),
    _llama_like("llama"),
    _llama_like("gemma3", scope=r"language_model", lora=r".*language_model\..*\.(?:q_proj|v_proj)"),
    _separate_qkv(
        "opt", r"self_attn", "out_proj", (r"layers\.\d+\.fc1", r"layers\.\d+\.fc2"), r"decoder\.layers"
    ),
    _separate_qkv(
        "bart",
        r"(?:self_attn|encoder_attn)",
        "out_proj",
        (r"layers\.\d+\.fc1", r"layers\.\d+\.fc2"),
        r"(?:encoder|decoder)\.layers",
    ),
    _separate_qkv("gptj", r"attn", "out_proj", (r"mlp\.fc_in", r"mlp\.fc_out"), r"h"),
    _T5,
]

LAYOUTS: tuple[Architecture, ...] = tuple(_ENTRIES)
TABLE: dict[str, Architecture] = {entry.name: entry for entry in _ENTRIES}
# Model types that share an entry's module names.
for alias, entry in {
    "roberta": "bert",
    "xlm-roberta": "bert",
    "electra": "bert",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "gemma3_text": "llama",
    "smollm3": "llama",
    "mt5": "t5",
}.items():
    TABLE[alias] = TABLE[entry]
