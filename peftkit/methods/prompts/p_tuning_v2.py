"""P-tuning v2 (Liu et al. 2021, arXiv:2110.07602): deep prompts at every layer, trained directly, with an
ordinary linear head instead of a verbalizer.

Deep prompts are prefix tuning's learned keys and values in front of every layer's attention (see
:mod:`.prefix_tuning`, whose machinery runs them), with the choices the paper makes for natural-language
understanding:
- no reparameterization: the prefixes (layers, 2, kv_heads, n, head_dim) are the trained tensors;
- a prompt length per task (``num_virtual_tokens``; the paper uses short ones for simple classification,
  longer ones, up to 100+, for hard sequence labelling);
- a randomly initialized linear head trained with the prompts, put in ``modules_to_save``: BERT's
  ``classifier`` reads the first token ([CLS], sequence classification) or every token (token
  classification such as NER). The checkpoint holds the prefixes and the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.config import AdapterConfig, as_name_tuple, check_positive_int, register_config
from peftkit.method_spec import NUM_VIRTUAL_TOKENS, declare_method
from peftkit.methods.prompts import hf_files, prefix_tuning
from peftkit.methods.registry import Method, no_base_parameters, register_method
from peftkit.task_type import task_type_value


@register_config
@dataclass(frozen=True)
class PTuningV2Config(AdapterConfig):
    """Fields:
    num_virtual_tokens: the deep prompt length ``n`` (per layer), chosen per task.
    modules_to_save: the task head trained in full next to the prompts, e.g. ``["classifier"]``.
    task_type: HF PEFT's task (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ...): a classification task adds the model's
        head to ``modules_to_save``, as in HF PEFT; written to files (None: read from the model).
    """

    method: ClassVar[str] = "p_tuning_v2"
    projection_size: ClassVar[None] = None  # prefix tuning's reparameterization: never, in P-tuning v2

    num_virtual_tokens: int = 20
    modules_to_save: tuple[str, ...] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._set("task_type", task_type_value(self.task_type))
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        self._set(
            "modules_to_save", as_name_tuple("modules_to_save", self.modules_to_save, allow_string=False)
        )


register_method(
    Method(
        name="p_tuning_v2",
        config_class=PTuningV2Config,
        inject=prefix_tuning.inject,
        trained_base_parameters=no_base_parameters,
        prepare_inputs=prefix_tuning.prepare_inputs,
        prepare_generation=prefix_tuning.prepare_generation,
        file_type="PEFTKIT_P_TUNING_V2",  # written as PREFIX_TUNING with peftkit's config beside (hf_files)
        to_file=hf_files.prefix_to_file("PEFTKIT_P_TUNING_V2"),
        from_file=hf_files.from_file("prefix_tuning", "PEFTKIT_P_TUNING_V2"),
    )
)


declare_method(
    "p_tuning_v2",
    "deep prompts at every layer, trained directly, with the task's linear head (Liu et al. 2021)",
    learning_rate=1e-2,
    options=(NUM_VIRTUAL_TOKENS,),
    build=lambda o, heads: PTuningV2Config(
        num_virtual_tokens=o["num_virtual_tokens"], modules_to_save=heads or None
    ),
)
