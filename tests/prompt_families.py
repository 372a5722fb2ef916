"""Tiny models of every family prompt methods support (random weights from transformers config classes, no
download), each with its kind: an encoder classifier, a decoder LM or an encoder-decoder.

Every model has 2 layers, width 32 (4 heads of 8) and a 64-token vocabulary, small enough that the whole set
runs in seconds; the shapes that matter for virtual tokens (KV heads, head_dim, the family's attention code)
are the family's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as tf
from torch import nn

VOCAB = 64
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # inside the tiny vocabulary
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, **SPECIAL}
ENCODER = {**COMMON, "intermediate_size": 48, "max_position_embeddings": 64, "num_labels": 3}
DECODER = {**COMMON, "intermediate_size": 48, "max_position_embeddings": 64}


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "encoder" (sequence classifier), "decoder" (causal LM) or "seq2seq"
    build_model: Callable[[], nn.Module]

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = self.build_model().eval()
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = 0
        return model


def _encoder(model_class, config_class, **extra):
    return lambda: model_class(config_class(**{**ENCODER, **extra}))


def _decoder(model_class, config_class, **extra):
    return lambda: model_class(config_class(**{**DECODER, **extra}))


def _t5(model_class=tf.T5ForConditionalGeneration, config_class=tf.T5Config, **extra):
    fields = {"vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4}
    return lambda: model_class(config_class(**fields, decoder_start_token_id=0, **SPECIAL, **extra))


FAMILIES = {
    f.name: f
    for f in [
        Family("bert", "encoder", _encoder(tf.BertForSequenceClassification, tf.BertConfig)),
        Family("roberta", "encoder", _encoder(tf.RobertaForSequenceClassification, tf.RobertaConfig)),
        Family(
            "xlm-roberta", "encoder", _encoder(tf.XLMRobertaForSequenceClassification, tf.XLMRobertaConfig)
        ),
        Family(
            "electra",
            "encoder",
            _encoder(tf.ElectraForSequenceClassification, tf.ElectraConfig, embedding_size=32),
        ),
        Family(
            "distilbert",
            "encoder",
            lambda: tf.DistilBertForSequenceClassification(
                tf.DistilBertConfig(
                    vocab_size=VOCAB,
                    dim=32,
                    n_layers=2,
                    n_heads=4,
                    hidden_dim=48,
                    num_labels=3,
                    pad_token_id=0,
                )
            ),
        ),
        Family(
            "albert",
            "encoder",
            _encoder(tf.AlbertForSequenceClassification, tf.AlbertConfig, embedding_size=16),
        ),
        Family(
            "deberta-v2",  # laid out as DeBERTa-v3 checkpoints are: relative attention, both position terms
            "encoder",
            _encoder(
                tf.DebertaV2ForSequenceClassification,
                tf.DebertaV2Config,
                relative_attention=True,
                pos_att_type=["p2c", "c2p"],
                position_buckets=8,
                max_relative_positions=-1,
                share_att_key=True,
                norm_rel_ebd="layer_norm",
                position_biased_input=False,
            ),
        ),
        Family(
            "modernbert",
            "encoder",
            _encoder(
                tf.ModernBertForSequenceClassification,
                tf.ModernBertConfig,
                global_attn_every_n_layers=2,
                local_attention=8,
                cls_token_id=1,
                sep_token_id=2,
            ),
        ),
        Family(
            "gpt2",
            "decoder",
            lambda: tf.GPT2LMHeadModel(
                tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **SPECIAL)
            ),
        ),
        Family("gpt-neox", "decoder", _decoder(tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig)),
        Family(
            "opt", "decoder", _decoder(tf.OPTForCausalLM, tf.OPTConfig, ffn_dim=48, word_embed_proj_dim=32)
        ),
        Family(
            "bloom",
            "decoder",
            lambda: tf.BloomForCausalLM(
                tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, **SPECIAL)
            ),
        ),
        Family("falcon", "decoder", _decoder(tf.FalconForCausalLM, tf.FalconConfig)),
        Family(
            "falcon-new",
            "decoder",
            _decoder(tf.FalconForCausalLM, tf.FalconConfig, new_decoder_architecture=True, num_kv_heads=2),
        ),
        Family(
            "gpt-j",
            "decoder",
            lambda: tf.GPTJForCausalLM(
                tf.GPTJConfig(
                    vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, **SPECIAL
                )
            ),
        ),
        Family("llama", "decoder", _decoder(tf.LlamaForCausalLM, tf.LlamaConfig, num_key_value_heads=2)),
        Family(
            "mistral", "decoder", _decoder(tf.MistralForCausalLM, tf.MistralConfig, num_key_value_heads=2)
        ),
        Family("qwen2", "decoder", _decoder(tf.Qwen2ForCausalLM, tf.Qwen2Config, num_key_value_heads=2)),
        Family(
            "qwen3",
            "decoder",
            _decoder(tf.Qwen3ForCausalLM, tf.Qwen3Config, num_key_value_heads=2, head_dim=8),
        ),
        Family("phi3", "decoder", _decoder(tf.Phi3ForCausalLM, tf.Phi3Config, num_key_value_heads=2)),
        Family(
            "gemma2",
            "decoder",
            _decoder(tf.Gemma2ForCausalLM, tf.Gemma2Config, num_key_value_heads=2, head_dim=8),
        ),
        Family(
            "gemma3",
            "decoder",
            _decoder(tf.Gemma3ForCausalLM, tf.Gemma3TextConfig, num_key_value_heads=2, head_dim=8),
        ),
        Family(
            "smollm3", "decoder", _decoder(tf.SmolLM3ForCausalLM, tf.SmolLM3Config, num_key_value_heads=2)
        ),
        Family("t5", "seq2seq", _t5()),
        Family("mt5", "seq2seq", _t5(tf.MT5ForConditionalGeneration, tf.MT5Config)),
        Family("t5-gated", "seq2seq", _t5(feed_forward_proj="gated-gelu")),
        Family(
            "bart",
            "seq2seq",
            lambda: tf.BartForConditionalGeneration(
                tf.BartConfig(
                    vocab_size=VOCAB,
                    d_model=32,
                    encoder_layers=2,
                    decoder_layers=2,
                    encoder_attention_heads=4,
                    decoder_attention_heads=4,
                    encoder_ffn_dim=48,
                    decoder_ffn_dim=48,
                    max_position_embeddings=64,
                    decoder_start_token_id=2,
                    forced_eos_token_id=None,  # generate() then decodes as plain greedy search does
                    **SPECIAL,
                )
            ),
        ),
    ]
}


def batch(family: Family, seed: int = 1, padded: bool = True) -> dict[str, torch.Tensor]:
    """Three rows of six tokens (ids 3.. avoid special tokens); with ``padded``, row 0's last two are padding
    (right padding: what encoders and encoder-decoders get)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 6), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, -2:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if family.kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (3, 4), generator=generator)
    return out
