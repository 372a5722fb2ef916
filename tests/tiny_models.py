"""Tiny models built from transformers config classes (random weights, no download), with matching inputs.

Each entry builds a fresh model with a fixed seed and gives a batch for it, so two calls build identical
models: one to wrap with peftkit, one kept pristine as the independent reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 64
BATCH, SEQ = 3, 6


@dataclass(frozen=True)
class TinyModel:
    name: str
    build_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], dict[str, torch.Tensor]]
    output: Callable[[object], torch.Tensor]  # the tensor to compare in a model's output
    targets: tuple[str, ...] | None  # None: use the architecture default
    kind: str = "other"  # "encoder", "decoder" (causal LM) or "seq2seq": which checks apply

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build_model().eval()

    def batch(self, seed: int = 1) -> dict[str, torch.Tensor]:
        return self.make_batch(torch.Generator().manual_seed(seed))


def _tokens(generator: torch.Generator, rows: int = BATCH, length: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=generator)


def _text_batch(generator):
    ids = _tokens(generator)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one padded row, so attention masks take part
    return {"input_ids": ids, "attention_mask": mask}


def _seq2seq_batch(generator):
    return {"input_ids": _tokens(generator), "decoder_input_ids": _tokens(generator, length=4)}


def _mlp_batch(generator):
    return {"input": torch.randn(BATCH, 10, generator=generator)}


class MLP(nn.Sequential):
    """A plain torch model: no config, no transformers."""

    def __init__(self):
        super().__init__(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _logits(output):
    return output.logits


TINY_MODELS = {
    "bert": TinyModel(
        "bert",
        lambda: BertForSequenceClassification(
            BertConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=48,
                max_position_embeddings=32,
                num_labels=3,
            )
        ),
        _text_batch,
        _logits,
        None,
        "encoder",
    ),
    "gpt2": TinyModel(
        "gpt2",
        lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)),
        _text_batch,
        _logits,
        None,
        "decoder",
    ),
    "llama": TinyModel(
        "llama",
        lambda: LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=32,
            )
        ),
        _text_batch,
        _logits,
        None,
        "decoder",
    ),
    "t5": TinyModel(
        "t5",
        lambda: T5ForConditionalGeneration(
            T5Config(
                vocab_size=VOCAB,
                d_model=32,
                d_kv=8,
                d_ff=48,
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=0,
            )
        ),
        _seq2seq_batch,
        _logits,
        None,
        "seq2seq",
    ),
    "mlp": TinyModel("mlp", MLP, _mlp_batch, lambda out: out, ("0", "2")),
}


# --- The families users fine-tune (the architecture matrix) ---------------------------------------------------
# Each at hidden 32, 2 layers, 4 heads, feed-forward 48 and vocabulary 64: every cell costs milliseconds. Where
# the real models differ in layout (grouped or multi-query KV heads, parallel blocks, gated feed-forward, a
# factorised embedding, relative positions), the tiny one keeps that layout.
_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
)
_NO_SPECIAL_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# A causal LM of those sizes with grouped KV heads (2 for 4 query heads): the base of the fused-loss and
# packing tests, built with LLaMA, Mistral or Qwen2 classes.
TINY_GQA_DECODER = dict(_SIZES, num_key_value_heads=2)


def _from_config(auto_class: str, config_class: str, **fields) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_class)(**fields)
        model = getattr(transformers, auto_class).from_config(config)
        if model.can_generate():  # generation runs its full length, as manual greedy decoding does
            model.generation_config.eos_token_id = None
        return model

    return build


def _encoder_pair(name: str, config_class: str, **fields) -> dict[str, TinyModel]:
    """The family with a sequence-classification head (``name``) and a token-classification one."""
    fields = {**_SIZES, "num_labels": 3, **fields}
    return {
        f"{name}{suffix}": TinyModel(
            f"{name}{suffix}",
            _from_config(auto, config_class, **fields),
            _text_batch,
            _logits,
            None,
            "encoder",
        )
        for suffix, auto in (
            ("", "AutoModelForSequenceClassification"),
            ("-token", "AutoModelForTokenClassification"),
        )
    }


def _decoder(name: str, config_class: str, **fields) -> dict[str, TinyModel]:
    build = _from_config("AutoModelForCausalLM", config_class, **{**_SIZES, **fields})
    return {name: TinyModel(name, build, _text_batch, _logits, None, "decoder")}


def _seq2seq(name: str, config_class: str, **fields) -> dict[str, TinyModel]:
    build = _from_config("AutoModelForSeq2SeqLM", config_class, **fields)
    return {name: TinyModel(name, build, _seq2seq_batch, _logits, None, "seq2seq")}


_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0)
# a window as long as the positions: sliding layers take part, and a padded row still sees what it sees alone
_LOCAL_AND_GLOBAL = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=64)

FAMILIES: dict[str, TinyModel] = {
    # encoders, each with a sequence- and a token-classification head
    **_encoder_pair("bert", "BertConfig"),
    **_encoder_pair("roberta", "RobertaConfig"),
    **_encoder_pair("distilbert", "DistilBertConfig", dim=32, n_layers=2, n_heads=4, hidden_dim=48),
    **_encoder_pair(
        "deberta-v2",  # DeBERTa-v3's layout: disentangled relative attention, no absolute positions
        "DebertaV2Config",
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        position_buckets=16,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
    ),
    **_encoder_pair("electra", "ElectraConfig", embedding_size=16),
    **_encoder_pair("albert", "AlbertConfig", embedding_size=16),  # one layer shared by every position
    **_encoder_pair("xlm-roberta", "XLMRobertaConfig"),
    **_encoder_pair(
        "modernbert",
        "ModernBertConfig",
        global_attn_every_n_layers=2,
        local_attention=8,
        cls_token_id=1,
        sep_token_id=2,
        **_NO_SPECIAL_TOKENS,
    ),
    # decoders
    "gpt2": TINY_MODELS["gpt2"],
    **_decoder("gpt-neox", "GPTNeoXConfig", rotary_pct=0.5),
    **_decoder("opt", "OPTConfig", ffn_dim=48, word_embed_proj_dim=32),
    **_decoder("bloom", "BloomConfig", n_layer=2, n_head=4),
    **_decoder("falcon", "FalconConfig", **_NO_SPECIAL_TOKENS),  # multi-query: one KV head
    **_decoder(
        "falcon-new", "FalconConfig", new_decoder_architecture=True, num_kv_heads=2, **_NO_SPECIAL_TOKENS
    ),
    **_decoder(
        "gpt-j",
        "GPTJConfig",
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        rotary_dim=4,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama": TINY_MODELS["llama"],
    **_decoder("mistral", "MistralConfig", num_key_value_heads=2, sliding_window=64),
    **_decoder("qwen2", "Qwen2Config", num_key_value_heads=2),
    **_decoder("qwen3", "Qwen3Config", num_key_value_heads=2, head_dim=8),
    **_decoder("phi3", "Phi3Config", num_key_value_heads=2, **_NO_SPECIAL_TOKENS),
    **_decoder("gemma2", "Gemma2Config", num_key_value_heads=2, head_dim=8, **_LOCAL_AND_GLOBAL),
    **_decoder("gemma3", "Gemma3TextConfig", num_key_value_heads=2, head_dim=8, **_LOCAL_AND_GLOBAL),
    **_decoder("smollm3", "SmolLM3Config", num_key_value_heads=2, **_NO_SPECIAL_TOKENS),
    # encoder-decoders
    "t5": TINY_MODELS["t5"],
    **_seq2seq("mt5", "MT5Config", **_T5),
    **_seq2seq("t5-gated-gelu", "T5Config", feed_forward_proj="gated-gelu", **_T5),
    **_seq2seq(
        "bart",
        "BartConfig",
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=64,
    ),
}


@torch.no_grad()
def run(model: nn.Module, tiny: TinyModel, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    """Forward ``batch`` for inference and return the output tensor to compare.

    Outputs are compared without autograd: with gradients enabled, torch's CPU attention picks its kernel by
    which inputs require grad, so a frozen and an unfrozen copy of the same model can differ in the last bit.
    """
    if tiny.name == "mlp":
        return tiny.output(model(batch["input"], **kwargs))
    return tiny.output(model(**batch, **kwargs))


def train_steps(model, tiny, steps: int = 3, lr: float = 1e-1) -> None:
    """A few AdamW steps on a squared-logits loss (enough to move every trainable tensor), then eval mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        model(**tiny.batch(seed=10 + step)).logits.pow(2).mean().backward()
        optimizer.step()
    model.eval()


def left_padded(tiny) -> dict[str, torch.Tensor]:
    """The tiny model's batch with row 0 left-padded by two positions (as decoder batches are for generate)."""
    batch = tiny.batch()
    mask = torch.ones_like(batch["input_ids"])
    mask[0, :2] = 0
    return {"input_ids": batch["input_ids"], "attention_mask": mask}


def manual_greedy(model, input_ids, attention_mask, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes, no cache; positions from the mask, as generate() makes them:
    the independent reference that generate() results are compared with."""
    ids, mask = input_ids, attention_mask
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def grad_scaler_steps_change_every_tensor(model: nn.Module, params: list, batches, lr: float = 1e-3) -> bool:
    """The standard fp16 AMP recipe (AdamW under a GradScaler) for one step per causal-LM batch in
    ``batches``; True when every tensor of ``params`` ended finite and moved."""
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model.train()
    for batch in batches:
        optimizer.zero_grad()
        scaler.scale(model(**batch, labels=batch["input_ids"]).loss).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
    finite = all(torch.isfinite(p).all() for p in params)
    return finite and all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
