"""How a causal LM's prompt becomes token ids, the same for training, evaluation, generation and serving.

A model pretrained with a beginning-of-sequence token at the start of every document reads a prompt without
it as the middle of some text: Gemma-3-270m's answer loss over 40 question/answer pairs is 6.5 without its
``<bos>`` and 3.2 with it, and prompt and prefix tuning trained without it collapse into "The The The".
Whether a model wants one is what its tokenizer does with a text on its own: Llama, Mistral and Gemma
tokenizers put their BOS first (or declare ``add_bos_token``), GPT-2, Qwen and SmolLM2 ones do not.
peftkit tokenizes the templated prompt with ``add_special_tokens=False`` (so that nothing lands after the
prompt, between it and the response) and then puts that BOS first itself, unless the text already
begins with it (a chat template that writes ``{{ bos_token }}``): never twice.
"""

from __future__ import annotations

from typing import Any

PROBE = "a"  # any ordinary text: what the tokenizer adds around it is what it adds around every text


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text on its own ([CLS] .. [SEP],
    <s> .., .. </s>): ``tokenizer(text)`` minus ``tokenizer(text, add_special_tokens=False)``."""
    plain = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(PROBE, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def expects_bos(tokenizer: Any) -> bool:
    """Whether texts for this tokenizer's model start with its BOS token: the tokenizer puts it first on its
    own, or declares ``add_bos_token`` (a slow-to-fast conversion can lose the post-processor that adds it).
    False for a tokenizer without a BOS token."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    leading, _ = special_tokens(tokenizer)
    return bos in leading or getattr(tokenizer, "add_bos_token", False) is True


def with_bos(tokenizer: Any, ids: list[int], expected: bool | None = None) -> list[int]:
    """``ids`` with the tokenizer's BOS token first when its model expects one (:func:`expects_bos`, or
    ``expected`` when the caller has asked already) and ``ids`` does not start with it yet."""
    expected = expects_bos(tokenizer) if expected is None else expected
    bos = tokenizer.bos_token_id
    if not expected or ids[:1] == [bos]:
        return list(ids)
    return [bos, *ids]


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """The model's own chat template when it has one (a user turn, then the assistant's cue), else the plain
    prompt and a newline."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def prompt_ids(tokenizer: Any, prompt: str, expected: bool | None = None) -> list[int]:
    """Token ids of ``prompt`` as the model sees it before its response: :func:`prompt_text`, tokenized
    without the tokenizer's own special tokens, then the BOS token first where the model expects one
    (:func:`with_bos`; ``expected`` saves asking the tokenizer again for every record of a batch)."""
    ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return with_bos(tokenizer, ids, expected)
