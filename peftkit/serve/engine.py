"""What a server is made of: one base model in a ``PeftModel``, its tokenizer, the adapter registry, the
scheduler and the metrics; and the translation of a request (prompt or chat messages, limits, sampling) into
a :class:`~peftkit.serve.sequence.Sequence`.

    engine = Engine.load(ServeConfig(model="smollm2", adapters={"qa": "runs/qa"}))  # then serve(engine)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from peftkit.config import ConfigError
from peftkit.model import PeftModel
from peftkit.prompt_tokens import with_bos
from peftkit.serve.batch import Runner
from peftkit.serve.classify import TOKEN, Classifier, ClassifyAdapter, ClassifyJob, classification_task
from peftkit.serve.metrics import Metrics
from peftkit.serve.registry import Registry, locate_adapter
from peftkit.serve.sampling import SamplingParams, TextStream
from peftkit.serve.scheduler import Scheduler
from peftkit.serve.sequence import Event, Sequence


class RequestError(ValueError):
    """A request the model cannot answer as asked; ``param`` names the field to change."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ServeConfig:
    model: str  # a built-in name (peftkit.assets.MODELS) or a local model folder
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter folder or run folder
    adapter_roots: list[str] = field(default_factory=list)  # where POST /v1/adapters may load from
    max_adapters: int = 64  # resident at once (least recently used evicted beyond)
    max_batch_size: int = 16
    max_tokens: int = 1024  # the most a request may ask for
    max_queue: int = 256  # waiting requests beyond which new ones get 429
    api_key: str | None = None
    served_name: str | None = None  # the base model's name in requests (default: the --model value)

    def __post_init__(self) -> None:
        for name in ("max_adapters", "max_batch_size", "max_tokens", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"`{name}` must be a positive integer, got {value!r}")


class Engine:
    def __init__(self, config: ServeConfig, model: PeftModel, tokenizer) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.base_name = config.served_name or Path(config.model).name
        self.metrics = Metrics()
        self.registry = Registry(model, config.max_adapters, [Path(p) for p in config.adapter_roots])
        self.context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.stop_ids = frozenset(_eos_ids(model, tokenizer))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.classifier = Classifier(self._classify_host, pad or 0, self.context, self.metrics)
        for name, path in config.adapters.items():
            self.add_adapter(name, path, trusted=True)
        runner = Runner(model, self.registry.input_methods, lambda: self.registry.changes)
        self.scheduler = Scheduler(
            runner,
            self.registry,
            self.metrics,
            base_name=self.base_name,
            max_batch_size=config.max_batch_size,
            max_queue=config.max_queue,
        )
        self.scheduler.classifier = self.classifier

    @classmethod
    def load(cls, config: ServeConfig, log=print) -> Engine:
        """Load the base model and tokenizer (peftkit's causal-LM task loader), wrap them, load the adapters
        the operator named (up to ``max_adapters`` of them stay resident)."""
        from peftkit.assets import resolve_model
        from peftkit.tasks import TASKS
        from peftkit.training.runtime import quiet_transformers

        task = TASKS["causal-lm"]
        model_dir = resolve_model(config.model, log=log)
        tokenizer = task.load_tokenizer(model_dir)
        with quiet_transformers():
            base = task.load_model(model_dir, None, tokenizer)
        return cls(config, PeftModel(base.eval(), None), tokenizer)

    def start(self) -> Engine:
        """Start the scheduler and load the named adapters (the first ``max_adapters`` stay resident)."""
        self.scheduler.start()
        for name in [*self.registry.known, *self.classifier.adapters]:
            self.preload(name).result()
        return self

    def stop(self) -> None:
        self.scheduler.stop()

    def add_adapter(self, name: str, path: str | os.PathLike, *, trusted: bool) -> str:
        """Know adapter ``name`` from ``path`` (a client's path, ``trusted`` False, must lie under an
        ``--adapter-root``); classification adapters go to the classifier. Returns the adapter's task."""
        from peftkit.model import AdapterError

        if name == self.base_name:
            raise ConfigError(f"adapter name {name!r} is the base model's name; pick another")
        if name in self.registry.known or name in self.classifier.adapters:
            raise AdapterError(f"an adapter named {name!r} is already served; DELETE it first")
        resolved = Path(path) if trusted else self.registry.allowed(path)
        directory, run_task, labels = locate_adapter(resolved)
        task = classification_task(directory, run_task, labels)
        if task is None:
            self.registry.add(name, resolved, trusted=True)
            return "causal-lm"
        self.classifier.adapters[name] = ClassifyAdapter(name, directory, *task)
        return task[0]

    def forget(self, name: str) -> None:
        """Undo :meth:`add_adapter` of an adapter that did not load."""
        self.registry.known.pop(name, None)
        self.classifier.adapters.pop(name, None)

    def remove_adapter(self, name: str):
        """Remove adapter ``name`` on the scheduler's thread (a generation adapter's running requests finish
        first); a future."""
        if name in self.classifier.adapters:
            return self.scheduler.call(lambda: self.classifier.remove(name))
        return self.scheduler.call(lambda: self.registry.remove(name))

    def preload(self, name: str):
        """Load adapter ``name`` now (on the scheduler's thread), so that a broken file fails here."""
        if name in self.classifier.adapters:
            return self.scheduler.call(lambda: self.classifier.load(name))

        def load() -> None:
            self.registry.acquire(name)
            self.registry.release(name)
            self.metrics.resident_adapters.set(len(self.registry.resident))

        return self.scheduler.call(load)

    # --- requests -----------------------------------------------------------------------------------------
    def served_models(self) -> list[str]:
        return [self.base_name, *self.registry.names(), *self.classifier.names()]

    def _classify_host(self, task: str):
        """The base model as ``task``'s model (its head is replaced by the classifier), on the generation
        model's device and in its dtype."""
        from peftkit.assets import resolve_model
        from peftkit.tasks import TASKS
        from peftkit.training.runtime import quiet_transformers

        parameter = next(self.model.base_model.parameters())
        with quiet_transformers():
            host = TASKS[task].load_model(resolve_model(self.config.model), ["LABEL_0"], self.tokenizer)
        host.config.pad_token_id = self.classifier.pad_id  # the task model finds a row's last token by it
        return host.to(device=parameter.device, dtype=parameter.dtype)

    def classify_job(self, adapter: str, inputs) -> ClassifyJob:
        """The request's texts tokenized as training tokenized them (special tokens added; for token
        classification, words split on whitespace unless given as lists). Raises RequestError naming
        ``input`` (or ``input[i]``) for an empty text or one longer than the model's context."""
        task = self.classifier.adapters[adapter].task
        items = [inputs] if isinstance(inputs, str) else list(inputs)
        if not items:
            raise RequestError("input", "`input` must hold at least one text")
        job = ClassifyJob(adapter, [], [] if task == TOKEN else None, [] if task == TOKEN else None)
        for index, item in enumerate(items):
            where = "input" if isinstance(inputs, str) else f"input[{index}]"
            if task == TOKEN:
                words = item.split() if isinstance(item, str) else list(item)
                encoding = self.tokenizer(words, is_split_into_words=True) if words else None
            elif isinstance(item, str):
                encoding = self.tokenizer(item)
            else:
                raise RequestError(where, f"{adapter!r} classifies texts (strings), got a list of words")
            ids = encoding["input_ids"] if encoding is not None else []
            blank = isinstance(item, str) and not item.strip()
            if blank or not ids or not words_covered(encoding, task, words if task == TOKEN else None):
                raise RequestError(where, "the text is empty, or a word of it has no token")
            if len(ids) > self.context:
                raise RequestError(
                    where, f"the text has {len(ids)} tokens; the model's context is {self.context} tokens"
                )
            job.ids.append(ids)
            if task == TOKEN:
                job.words.append(words)
                job.word_ids.append(encoding.word_ids())
        return job

    def chat_prompt(self, adapter: str, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` in the adapter's chat template (its folder's, else the tokenizer's);
        without any template, the contents one per line and a newline, as ``peftkit train`` formats a
        prompt for a model without one."""
        template = None if adapter == self.base_name else self.registry.get(adapter).chat_template
        if template or self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True
            )
        else:
            text = "\n".join(m["content"] for m in messages) + "\n"
        return with_bos(self.tokenizer, self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a completion prompt: the text as it is, after the BOS token where the model expects
        one (as ``peftkit train`` tokenizes prompts, see :mod:`peftkit.prompt_tokens`), or the client's own
        token ids as given, checked against the vocabulary."""
        if isinstance(prompt, list):
            vocab = len(self.tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise RequestError("prompt", f"token ids must lie in [0, {vocab}), got {bad[:5]}")
            return prompt
        return with_bos(self.tokenizer, self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def sequence(
        self,
        adapter: str,
        prompt_ids: list[int],
        max_tokens: int | None,
        params: SamplingParams,
        emit,
        prompt_field: str = "prompt",
        streaming: bool = True,
    ) -> Sequence:
        """A request ready to submit; ``streaming`` False: its text is handed over once, when it ends (no
        per-token events, no per-token detokenization without stop strings). Raises RequestError naming
        ``max_tokens`` or the prompt's field when they do not fit the model's context or the server's limit."""
        if not prompt_ids:
            raise RequestError(prompt_field, "the prompt is empty after tokenization")
        room = self.context - len(prompt_ids)
        if room < 1:
            raise RequestError(
                prompt_field,
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.context} tokens",
            )
        limit = min(self.config.max_tokens, room)
        wanted = limit if max_tokens is None else max_tokens
        if wanted > limit:
            raise RequestError(
                "max_tokens",
                f"`max_tokens` is {wanted}, but at most {limit} fit (the server's --max-tokens "
                f"{self.config.max_tokens}; {room} positions left after a {len(prompt_ids)}-token prompt)",
            )
        return Sequence(
            adapter=adapter,
            prompt_ids=list(prompt_ids),
            max_tokens=wanted,
            params=params,
            stream=TextStream(self.tokenizer, params.stop, incremental=streaming),
            final_only=not streaming,
            emit=emit,
            stop_ids=frozenset() if params.ignore_eos else self.stop_ids,
            context=self.context,
            generator=params.generator(),
        )


def words_covered(encoding, task: str, words: list[str] | None) -> bool:
    """Whether every word got at least one token (a word without one could not be labelled)."""
    if task != TOKEN:
        return True
    return {w for w in encoding.word_ids() if w is not None} == set(range(len(words)))


def _eos_ids(model: PeftModel, tokenizer) -> list[int]:
    """End-of-sequence ids: the generation config's (one id or a list), else the tokenizer's."""
    eos = getattr(getattr(model.base_model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def api_key_from_environment() -> str | None:
    return os.environ.get("PEFTKIT_API_KEY") or None


__all__ = ["Engine", "Event", "RequestError", "ServeConfig"]
