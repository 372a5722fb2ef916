"""Causal LM instruction tuning (loss on the response only) and seq2seq (loss, ROUGE on generations)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from peftkit.data.model_checks import check_positions
from peftkit.prompt_tokens import expects_bos, prompt_ids
from peftkit.tasks.base import Metric, Task, batches, model_device, to_device

IGNORE = -100
SAMPLES = 3  # generations shown with each evaluation
ROUGE_EXAMPLES = 32  # generations scored with ROUGE per evaluation (generation is the slow part)


class CausalLM(Task):
    name = "causal-lm"
    primary = Metric("loss", higher_is_better=False)

    def load_model(self, model_dir: Path, label_names, tokenizer) -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def collate(self, records, tokenizer, max_length):
        """``[bos] + prompt + response + eos``, right-padded (BOS where the model expects one, see
        :mod:`peftkit.prompt_tokens`); labels are -100 on the prompt and the padding, so the loss is on the
        response tokens only."""
        rows, labels = [], []
        bos = expects_bos(tokenizer)
        for record in records:
            prompt = prompt_ids(tokenizer, record["prompt"], bos)
            response_ids = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
            ids = (prompt + response_ids + [tokenizer.eos_token_id])[:max_length]
            rows.append(ids)
            labels.append(([IGNORE] * len(prompt) + response_ids + [tokenizer.eos_token_id])[:max_length])
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        label_tensor = torch.full((len(rows), width), IGNORE)
        for i, (ids, lab) in enumerate(zip(rows, labels, strict=True)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            label_tensor[i, : len(lab)] = torch.tensor(lab)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_tensor}

    @torch.no_grad()
    def evaluate(self, model, records, tokenizer, *, batch_size, max_length, label_names):
        model.eval()
        loss_sum, count = 0.0, 0
        for chunk in batches(records, batch_size):
            batch = to_device(self.collate(chunk, tokenizer, max_length), model_device(model))
            tokens = int((batch["labels"][:, 1:] != IGNORE).sum())  # the loss scores position t+1 from t
            if tokens == 0:  # every row's response cut off by max_length: its mean loss would be 0/0
                continue
            loss_sum, count = loss_sum + model(**batch).loss.item() * tokens, count + tokens
        loss = loss_sum / max(count, 1)
        samples = self.predict(
            model,
            [r["prompt"] for r in records[:SAMPLES]],
            tokenizer,
            max_length=max_length,
            label_names=None,
            max_new_tokens=32,
        )
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "samples": [
                {"prompt": r["prompt"], "reference": r["response"], "generated": g}
                for r, g in zip(records[:SAMPLES], samples, strict=True)
            ],
        }

    @torch.no_grad()
    def predict(self, model, inputs, tokenizer, *, max_length, label_names, max_new_tokens=64):
        """Greedy generations, one prompt at a time (no padding to get wrong), each prompt formatted as in
        training (:func:`~peftkit.prompt_tokens.prompt_ids`)."""
        model.eval()
        outputs = []
        bos, device = expects_bos(tokenizer), model_device(model)
        for prompt in inputs:
            input_ids = torch.tensor([prompt_ids(tokenizer, prompt, bos)], device=device)
            check_positions(  # a longer prompt would index past the position embeddings
                model,
                [(f"prompt {len(outputs) + 1}", input_ids.shape[1]), ("--max-new-tokens", max_new_tokens)],
            )
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            outputs.append(tokenizer.decode(generated[0, input_ids.shape[1] :], skip_special_tokens=True))
        return outputs


class Seq2Seq(Task):
    name = "seq2seq"
    primary = Metric("rougeL", higher_is_better=True)

    def load_model(self, model_dir: Path, label_names, tokenizer) -> nn.Module:
        return AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32)

    def collate(self, records, tokenizer, max_length):
        batch = tokenizer(
            [r["source"] for r in records],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        targets = tokenizer(
            text_target=[r["target"] for r in records],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, IGNORE)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}

    @torch.no_grad()
    def evaluate(self, model, records, tokenizer, *, batch_size, max_length, label_names):
        model.eval()
        loss_sum, count = 0.0, 0
        for chunk in batches(records, batch_size):
            batch = to_device(self.collate(chunk, tokenizer, max_length), model_device(model))
            tokens = int((batch["labels"] != IGNORE).sum())
            loss_sum, count = loss_sum + model(**batch).loss.item() * tokens, count + tokens
        scored = records[:ROUGE_EXAMPLES]
        generated = self.predict(
            model,
            [r["source"] for r in scored],
            tokenizer,
            max_length=max_length,
            label_names=None,
            max_new_tokens=32,
        )
        # imported here: rouge_score's NLTK brings scikit-learn, SciPy and pandas (about 150 MiB resident)
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        scores = [scorer.score(r["target"], g) for r, g in zip(scored, generated, strict=True)]
        metrics = {
            key: sum(s[key].fmeasure for s in scores) / len(scores) for key in ("rouge1", "rouge2", "rougeL")
        }
        samples = [
            {"source": r["source"][:200], "reference": r["target"], "generated": g}
            for r, g in zip(scored[:SAMPLES], generated, strict=False)
        ]
        return {"loss": loss_sum / max(count, 1), **metrics, "samples": samples}

    @torch.no_grad()
    def predict(self, model, inputs, tokenizer, *, max_length, label_names, max_new_tokens=64):
        model.eval()
        batch = tokenizer(
            list(inputs), truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        check_positions(model, [("--max-new-tokens", max_new_tokens)])  # the decoder's own positions
        generated = model.generate(
            **to_device(dict(batch), model_device(model)), max_new_tokens=max_new_tokens, do_sample=False
        )
        return tokenizer.batch_decode(generated, skip_special_tokens=True)
