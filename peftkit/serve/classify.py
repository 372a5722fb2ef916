"""``POST /v1/classify``: sequence classification (a label and scores per text) and token classification
(NER: a label and score per word, and the entity spans) with many adapters of one base model.

One task model per task kind (sequence or token classification) is built from the base folder, when the
first adapter of that kind is loaded; its head is replaced by a :class:`~peftkit.serve.heads.HeadBank`
holding every adapter's own head. Texts of all waiting requests of a kind go through one forward pass, each
row through its adapter (``PeftModel``'s mixed batch for the adapter layers, the bank for the heads).
Adapters that enter through the inputs (prompt tuning, prefix tuning, P-tuning) cannot share a pass with
other rows and run in a pass of their own rows. Rows are right-padded: a decoder's position ids then equal
those of the text alone, and the task model finds each row's last real token by the pad id as it does in
training.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peftkit import checkpoint
from peftkit.config import ConfigError
from peftkit.methods import method_for_file
from peftkit.model import PeftModel
from peftkit.module_paths import replace_module
from peftkit.serve.heads import HeadBank, bio_entities, fresh_heads, head_paths, label_count
from peftkit.serve.registry import AdapterNotFound

SEQUENCE, TOKEN = "sequence-classification", "token-classification"
CLASSIFY_TASKS = (SEQUENCE, TOKEN)
TASK_TYPES = {"SEQ_CLS": SEQUENCE, "TOKEN_CLS": TOKEN}  # adapter_config.json's task_type (HF PEFT's names)


@dataclass
class ClassifyAdapter:
    name: str
    directory: Path
    task: str  # SEQUENCE or TOKEN
    label_names: list[str] | None  # the run's labels.json; None: LABEL_0, LABEL_1, ... after loading
    input_method: bool = False  # prompt / prefix tuning: its rows get a pass of their own


@dataclass(eq=False)
class ClassifyJob:
    """One request's texts, tokenized: ``ids[i]`` the token ids of text i, ``words[i]`` its words and
    ``word_ids[i]`` the word of each token (None for special tokens) for token classification."""

    adapter: str
    ids: list[list[int]]
    words: list[list[str]] | None = None
    word_ids: list[list[int | None]] | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


def classification_task(directory: Path, run_task: str | None = None, labels=None) -> tuple[str, list] | None:
    """(task, label names) when the adapter in ``directory`` is a classification adapter, else None. A run's
    ``labels.json`` (``run_task``, ``labels``) decides; a bare adapter folder tells by its ``task_type``."""
    if run_task is not None:
        return (run_task, labels) if run_task in CLASSIFY_TASKS else None
    config = checkpoint.open_adapter(directory).config
    task = TASK_TYPES.get(config.get("task_type"))
    return None if task is None else (task, None)


class Classifier:
    """The classification adapters and their task models; only the scheduler's thread loads, removes and
    runs (so no pass sees a model change under it)."""

    def __init__(
        self, load_host: Callable[[str], nn.Module], pad_id: int, context: int, metrics=None
    ) -> None:
        self.load_host = load_host  # task -> the base model as that task's model (its head is replaced)
        self.pad_id = pad_id
        self.context = context
        self.hosts: dict[str, PeftModel] = {}
        self.banks: dict[str, dict[str, HeadBank]] = {}  # task -> head path -> bank
        self.adapters: dict[str, ClassifyAdapter] = {}  # known (named by the operator or loaded by a client)
        self.loaded: set[str] = set()
        self.metrics = metrics  # peftkit.serve.metrics.Metrics, for the rows per pass

    def names(self) -> list[str]:
        return sorted(self.adapters)

    # --- adapters (the scheduler's thread) ---------------------------------------------------------------
    def load(self, name: str) -> None:
        """Load adapter ``name``: its adapter layers into the task's ``PeftModel`` (its saved head is loaded
        into a head of its own width put in the head's place for the load), its head into the bank."""
        adapter = self.adapters[name]
        host = self._host(adapter.task)
        model = host.base_model
        files = checkpoint.open_adapter(adapter.directory)
        paths = list(self.banks[adapter.task])
        labels = label_count(files.header, paths, adapter.directory)
        if adapter.label_names is not None and len(adapter.label_names) != labels:
            raise ConfigError(
                f"{adapter.directory}: the head has {labels} labels, labels.json names {len(adapter.label_names)}"
            )
        for path, head in fresh_heads(model, paths, labels).items():
            replace_module(model, path, head)
        try:
            host.load_adapter(adapter.directory, name)
            heads = {path: model.get_submodule(path).modules_to_save[name] for path in paths}
        finally:
            for path, bank in self.banks[adapter.task].items():
                replace_module(model, path, bank)
        for path, head in heads.items():
            self.banks[adapter.task][path].heads[name] = head.eval()
        adapter.label_names = adapter.label_names or [f"LABEL_{i}" for i in range(labels)]
        adapter.input_method = method_for_file(files.config).prepare_inputs is not None
        self.loaded.add(name)

    def remove(self, name: str) -> None:
        adapter = self.adapters.pop(name)
        if name in self.loaded:
            self.hosts[adapter.task].delete_adapter(name)
            for bank in self.banks[adapter.task].values():
                bank.heads.pop(name, None)
            self.loaded.discard(name)

    def _host(self, task: str) -> PeftModel:
        if task not in self.hosts:
            model = self.load_host(task).eval()
            self.banks[task] = {path: HeadBank() for path in head_paths(model)}
            for path, bank in self.banks[task].items():
                replace_module(model, path, bank)
            self.hosts[task] = PeftModel(model, None)
        return self.hosts[task]

    # --- passes (the scheduler's thread) -----------------------------------------------------------------
    def run(self, jobs: list[ClassifyJob], max_rows: int) -> None:
        """Answer ``jobs`` (futures not yet cancelled): rows of one task and of mixable adapters share passes
        of at most ``max_rows`` rows; each job's future gets its list of results (or the error)."""
        rows = [(job, i) for job in jobs for i in range(len(job.ids))]
        groups: dict[tuple, list] = {}
        for job, i in rows:
            adapter = self.adapters.get(job.adapter)
            task = adapter.task if adapter else None
            alone = job.adapter if adapter is not None and adapter.input_method else None
            groups.setdefault((task, alone), []).append((job, i))
        results: dict[ClassifyJob, dict[int, dict]] = {job: {} for job in jobs}
        failed: dict[ClassifyJob, Exception] = {}
        for (task, alone), members in groups.items():
            for start in range(0, len(members), max_rows):
                chunk = members[start : start + max_rows]
                try:
                    for (job, i), result in zip(chunk, self._pass(task, alone, chunk), strict=True):
                        results[job][i] = result
                except Exception as error:  # a model error ends these requests, not the server
                    for job, _ in chunk:
                        failed[job] = error
        for job in jobs:
            if job in failed:
                job.future.set_exception(failed[job])
            else:
                job.future.set_result([results[job][i] for i in range(len(job.ids))])

    def _pass(self, task: str | None, alone: str | None, chunk: list) -> list[dict]:
        if task is None or any(job.adapter not in self.loaded for job, _ in chunk):
            missing = sorted({job.adapter for job, _ in chunk if job.adapter not in self.loaded})
            raise AdapterNotFound(f"classification adapters {missing} are not served (removed meanwhile)")
        host = self.hosts[task]
        names = [job.adapter for job, _ in chunk]
        longest = max(len(job.ids[i]) for job, i in chunk)
        ids = torch.full(
            (len(chunk), longest), self.pad_id, dtype=torch.long
        )  # (rows, longest), right-padded
        mask = torch.zeros_like(ids)
        for row, (job, i) in enumerate(chunk):
            ids[row, : len(job.ids[i])] = torch.tensor(job.ids[i])
            mask[row, : len(job.ids[i])] = 1
        device = next(host.base_model.parameters()).device
        if self.metrics is not None:
            self.metrics.classify_pass_rows.observe(len(chunk))
        for bank in self.banks[task].values():
            bank.rows = names
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if alone is not None:  # virtual tokens in front: this adapter's rows alone, through its method
            host.set_adapter(alone)
            logits = host(**batch).logits
        else:
            logits = host(**batch, adapter_names=names).logits
        logits = logits.float().cpu()
        if task == SEQUENCE:
            return [self._sequence_result(job, logits[row]) for row, (job, _) in enumerate(chunk)]
        logits = logits[:, logits.shape[1] - longest :]  # the real positions (virtual tokens come first)
        return [self._token_result(job, i, logits[row]) for row, (job, i) in enumerate(chunk)]

    def _sequence_result(self, job: ClassifyJob, logits: torch.Tensor) -> dict:
        """``logits`` (widest labels,): the row's label, its probability, every label's probability."""
        labels = self.adapters[job.adapter].label_names
        probs = torch.softmax(logits[: len(labels)], dim=-1)
        best = int(probs.argmax())
        return {
            "label": labels[best],
            "score": float(probs[best]),
            "scores": {label: float(p) for label, p in zip(labels, probs, strict=True)},
        }

    def _token_result(self, job: ClassifyJob, i: int, logits: torch.Tensor) -> dict:
        """``logits`` (positions, widest labels): each word labelled by its first token (as training labels
        it), with that label's probability; and the entity spans the labels make (BIO scheme)."""
        labels = self.adapters[job.adapter].label_names
        words, chosen, scores, seen = job.words[i], [], [], set()
        for position, word in enumerate(job.word_ids[i]):
            if word is None or word in seen:
                continue
            seen.add(word)
            probs = torch.softmax(logits[position, : len(labels)], dim=-1)
            best = int(probs.argmax())
            chosen.append(labels[best])
            scores.append(float(probs[best]))
        tokens = [
            {"word": w, "label": lab, "score": s} for w, lab, s in zip(words, chosen, scores, strict=True)
        ]
        return {"tokens": tokens, "entities": bio_entities(words, chosen, scores)}
