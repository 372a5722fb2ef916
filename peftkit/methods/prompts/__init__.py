"""Prompt-space methods: the frozen model reads learned continuous vectors; no weight changes.

- :mod:`.virtual_tokens`: what they share (input embedding, mask / position / label extension).
- :mod:`.prompt_tuning`: prompts at the input layer (Lester et al. 2021), with prompt ensembles.
- :mod:`.prefix_tuning`: learned keys and values at every attention layer (Li & Liang 2021).
"""

from peftkit.methods.prompts import prefix_tuning, prompt_tuning  # noqa: F401  (registers the methods)
from peftkit.methods.prompts.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompts.prompt_tuning import PromptTuningConfig

__all__ = ["PrefixTuningConfig", "PromptTuningConfig"]
