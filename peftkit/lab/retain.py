"""Retained general ability: how well a tuned model still models text unrelated to its task (forgetting).

After training, each method's model (adapter active) and, once, the untouched base model are scored on the
same held-out general text:

- causal LMs: perplexity, ``exp(mean negative log-likelihood)`` of every token of fixed windows of
  ``length`` tokens, each predicted from the tokens before it in its window (the first token of a window is
  context only; a model pretrained with a BOS token before every text gets it first in each window). The documents are tokenized without special tokens and joined with the tokenizer's EOS
  token, then cut into consecutive windows; the first ``max_tokens`` tokens' worth of windows are scored
  (every window full: no padding, so every run scores exactly the same tokens);
- encoders (classification, tagging): the masked-LM loss of the tuned encoder under the base checkpoint's
  masked-LM head, where the checkpoint has one (:mod:`peftkit.lab.retain_mlm`); "not applicable" otherwise,
  and for seq2seq models.

``python -m peftkit.lab.retain RUN_DIR TEXT OUT`` scores the base model of a finished run (its model, task and
quantization, without the adapter) and writes the result as JSON to OUT.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from peftkit.config import ConfigError
from peftkit.prompt_tokens import expects_bos

DEFAULT_TOKENS = 8192  # tokens scored: ~2 % standard error on the perplexity of ordinary prose
DEFAULT_LENGTH = 256  # tokens per window
TEXT_FIELDS = ("text", "prompt", "response", "source", "target")  # a built-in record's text, in order


def read_documents(source: str) -> list[str]:
    """The documents of ``source``: a ``.txt`` file (one document) or a built-in data set's name (each record
    one document: its text fields, e.g. a news article and its title, one per line). Raises ConfigError
    for anything else."""
    from peftkit.data import BUILTIN_DATASETS, load_records

    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if source in BUILTIN_DATASETS and not path.exists():
        _, records, _, _ = load_records(source)
        return ["\n".join(str(r[k]) for k in TEXT_FIELDS if isinstance(r.get(k), str)) for r in records]
    raise ConfigError(
        f"--retain-eval expects a .txt file or a built-in data set ({', '.join(BUILTIN_DATASETS)}), "
        f"got {source!r}"
    )


def token_windows(
    documents: list[str], tokenizer, length: int, max_tokens: int, bos: int | None = None
) -> torch.Tensor:
    """``(windows, length)`` token ids: the documents tokenized, joined with EOS, cut into consecutive full
    windows; ``ceil(max_tokens / length)`` of them at most. With ``bos`` (the BOS id of a model pretrained
    with one at the start of every text, see :func:`peftkit.prompt_tokens.expects_bos`) each window is that
    token and the next ``length - 1`` text tokens, so that its first text token is read as a text's start
    rather than as a text's middle, the way the model was trained. Raises ConfigError when the text does not
    fill one window or the sizes are not positive."""
    if length < 2 or max_tokens < length:
        raise ConfigError(
            f"--retain-length must be at least 2 and --retain-tokens at least the length, got length {length}, "
            f"tokens {max_tokens}"
        )
    wanted = math.ceil(max_tokens / length) * length
    ids: list[int] = []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False)["input_ids"] + separator
        if len(ids) >= wanted:
            break
    text_length = length - (bos is not None)  # text tokens per window
    count = min(wanted // length, len(ids) // text_length)
    if count == 0:
        raise ConfigError(f"the retain-eval text holds {len(ids)} tokens, fewer than one window of {length}")
    windows = torch.tensor(ids[: count * text_length]).view(count, text_length)
    if bos is not None:
        windows = torch.cat([torch.full((count, 1), bos), windows], dim=1)
    return windows


@torch.no_grad()
def causal_lm_nll(model, windows: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """(mean negative log-likelihood in nats per predicted token, tokens predicted) of ``windows``
    ``(n, length)`` under ``model``, with whatever adapter it has active. Uses the model's own loss (so
    virtual tokens of prompt-style methods are handled as in training): every window has ``length - 1``
    predicted tokens, so the batch means weight equally."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size].to(device)  # (batch, length)
        loss = model(input_ids=chunk, attention_mask=torch.ones_like(chunk), labels=chunk).loss
        predicted = chunk.shape[0] * (chunk.shape[1] - 1)
        total, count = total + loss.item() * predicted, count + predicted
    model.train(was_training)
    return total / count, count


def retained_ability(model, task: str, windows: torch.Tensor | None) -> dict[str, Any]:
    """``{"measure": "perplexity", "loss": nats per token, "perplexity": exp(loss), "tokens": n}`` for a
    causal LM; ``{"measure": None, "note": why}`` where the measure does not apply."""
    if task != "causal-lm":
        return {"measure": None, "note": f"not applicable to {task} models (perplexity needs a causal LM)"}
    loss, tokens = causal_lm_nll(model, windows)
    return {"measure": "perplexity", "loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


ENCODER_TASKS = ("sequence-classification", "token-classification")


def evaluate_retention(
    model, task: str, tokenizer, settings: dict[str, Any], model_dir: str | Path | None = None
) -> dict[str, Any]:
    """The retained ability of ``model`` (a ``task`` model, its adapter active) on the text of ``settings``
    (``{"text", "tokens", "length"}``): perplexity for a causal LM, the masked-LM loss for an encoder whose
    base checkpoint (``model_dir``) has a masked-LM head, else a note. The settings are kept in the result,
    so that a later comparison can tell whether it measured the same."""
    from peftkit.lab.retain_mlm import encoder_mlm_ability

    result = retained_ability(model, task, None) if task != "causal-lm" else None
    if task == "causal-lm" or (task in ENCODER_TASKS and model_dir is not None):
        documents = read_documents(settings["text"])
        if task == "causal-lm":
            bos = tokenizer.bos_token_id if expects_bos(tokenizer) else None
            windows = token_windows(documents, tokenizer, settings["length"], settings["tokens"], bos)
            result = retained_ability(model, task, windows)
        else:  # room for the encoder's CLS and SEP around each window
            windows = token_windows(documents, tokenizer, settings["length"] - 2, settings["tokens"])
            result = encoder_mlm_ability(model, model_dir, tokenizer, windows)
    return {**result, "settings": dict(settings)}


def evaluate_base(run_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The retained ability of the base model of the run in ``run_dir``: its model, task and quantization
    (``prepare_base``), without the adapter."""
    from peftkit.assets import resolve_model
    from peftkit.tasks import TASKS
    from peftkit.training.layout import RunFolder
    from peftkit.training.methods import prepare_base
    from peftkit.training.runtime import quiet_transformers

    folder = RunFolder(run_dir)
    config = folder.read_config()
    task_name, label_names = folder.read_labels()
    task = TASKS[task_name]
    model_dir = resolve_model(config.model)
    tokenizer = task.load_tokenizer(model_dir)
    torch.manual_seed(config.seed)  # a fresh task head (classification) is random; the measure skips it
    with quiet_transformers():
        base = task.load_model(model_dir, label_names, tokenizer)
    prepare_base(config, base)
    return evaluate_retention(base, task_name, tokenizer, settings, model_dir)


def main(argv: list[str] | None = None) -> int:
    """The base model's retained-ability score in a process of its own (the lab's driver starts it): reads
    RUN_DIR's model and settings, scores TEXT, writes the JSON result to OUTPUT whole or not at all."""
    parser = argparse.ArgumentParser(prog="python -m peftkit.lab.retain", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("text")
    parser.add_argument("output", type=Path)
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--length", type=int, default=DEFAULT_LENGTH)
    args = parser.parse_args(argv)
    settings = {"text": args.text, "tokens": args.tokens, "length": args.length}
    result = evaluate_base(args.run_dir, settings)
    partial = args.output.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=1) + "\n")
    partial.replace(args.output)  # never a half-written file
    return 0


if __name__ == "__main__":
    sys.exit(main())
