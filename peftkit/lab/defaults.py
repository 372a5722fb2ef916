"""What a comparison runs by default, and the settings each method starts from.

One learning rate for every method would compare methods at someone else's optimum: full fine-tuning of a
BERT-style encoder diverges or forgets at LoRA's 2e-3, while (IA)³'s scaling vectors barely move at full
fine-tuning's 5e-5. Each method's own learning rate is declared with the method (``declare_method`` in its
module; the usual starting points from the methods' papers and the Hugging Face PEFT examples, not tuned on
the comparison's own data), and a built-in dataset may name its own (``learning_rates`` in
:data:`peftkit.data.builtin.BUILTIN_DATASETS`): :func:`peftkit.training.config.default_learning_rate` reads
both, for ``peftkit train`` and for the lab alike. A setting the user gives (a flag, the YAML file,
``--method-setting``) always wins.
"""

from __future__ import annotations

from typing import Any

from peftkit.data.builtin import BUILTIN_DATASETS
from peftkit.method_spec import METHOD_SPECS
from peftkit.training.config import default_learning_rate

# each declared method's own settings (today: its learning rate)
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    name: {"learning_rate": spec.learning_rate} for name, spec in METHOD_SPECS.items()
}

# where a built-in dataset moves a method's working point (declared with the dataset)
DATASET_METHOD_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    name: {method: {"learning_rate": rate} for method, rate in dataset.learning_rates.items()}
    for name, dataset in BUILTIN_DATASETS.items()
    if dataset.learning_rates
}

# what `peftkit compare` runs when no --methods are given
DEFAULT_METHODS = (
    "full",
    "lora",
    "ia3",
    "bitfit",
    "bottleneck",
    "layer_tuning",
    "prompt_tuning",
    "p_tuning",
    "prefix_tuning",
    "p_tuning_v2",
)


def default_method_settings(
    methods, keep: set[str] | frozenset[str] = frozenset(), dataset: str | None = None
) -> dict[str, dict[str, Any]]:
    """Each method's starting settings for ``dataset`` (see :func:`default_learning_rate`), leaving out the
    settings named in ``keep`` (those the user chose for every method). A method nobody declared gets none
    (its run then fails with the list of declared methods)."""
    settings = {
        m: {"learning_rate": default_learning_rate(m, dataset)} if m in METHOD_SPECS else {} for m in methods
    }
    return {m: {k: v for k, v in values.items() if k not in keep} for m, values in settings.items()}
