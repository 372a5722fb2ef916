"""Prompt-space methods: the frozen model reads learned continuous vectors; no weight changes.

- :mod:`.virtual_tokens`: what they share (input embedding, mask / position / label extension).
- :mod:`.prompt_tuning`: prompts at the input layer (Lester et al. 2021), with prompt ensembles.
"""

from peftkit.methods.prompts import prompt_tuning  # noqa: F401  (registers the method)
from peftkit.methods.prompts.prompt_tuning import PromptTuningConfig

__all__ = ["PromptTuningConfig"]
