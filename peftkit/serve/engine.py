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
from peftkit.serve.metrics import Metrics
from peftkit.serve.registry import Registry
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
        for name, path in config.adapters.items():
            if name == self.base_name:
                raise ConfigError(f"adapter name {name!r} is the base model's name; pick another")
            self.registry.add(name, path, trusted=True)
        runner = Runner(model, self.registry.input_methods)
        self.scheduler = Scheduler(
            runner,
            self.registry,
            self.metrics,
            base_name=self.base_name,
            max_batch_size=config.max_batch_size,
            max_queue=config.max_queue,
        )

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
        for name in list(self.registry.known):
            self.preload(name).result()
        return self

    def stop(self) -> None:
        self.scheduler.stop()

    def preload(self, name: str):
        """Load adapter ``name`` now (on the scheduler's thread), so that a broken file fails here."""

        def load() -> None:
            self.registry.acquire(name)
            self.registry.release(name)
            self.metrics.resident_adapters.set(len(self.registry.resident))

        return self.scheduler.call(load)

    # --- requests -----------------------------------------------------------------------------------------
    def served_models(self) -> list[str]:
        return [self.base_name, *self.registry.names()]

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
    ) -> Sequence:
        """A request ready to submit. Raises RequestError naming ``max_tokens`` or the prompt's field when
        they do not fit the model's context or the server's limit."""
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
            stream=TextStream(self.tokenizer, params.stop),
            emit=emit,
            stop_ids=frozenset() if params.ignore_eos else self.stop_ids,
            context=self.context,
            generator=params.generator(),
        )


def _eos_ids(model: PeftModel, tokenizer) -> list[int]:
    """End-of-sequence ids: the generation config's (one id or a list), else the tokenizer's."""
    eos = getattr(getattr(model.base_model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def api_key_from_environment() -> str | None:
    return os.environ.get("PEFTKIT_API_KEY") or None


__all__ = ["Engine", "Event", "RequestError", "ServeConfig"]
