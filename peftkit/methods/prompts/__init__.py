"""Prompt-space methods: the frozen model reads learned continuous vectors; no weight changes.

- :mod:`.virtual_tokens`: what they share (input embedding, mask / position / label extension).
- :mod:`.prompt_tuning`: prompts at the input layer (Lester et al. 2021), with prompt ensembles.
- :mod:`.p_tuning`: prompts made by a prompt encoder, placed through a template (Liu et al. 2021).
- :mod:`.prefix_tuning`: learned keys and values at every attention layer (Li & Liang 2021).
- :mod:`.p_tuning_v2`: deep prompts trained directly with a linear head (Liu et al. 2021), on prefix tuning.
"""

from peftkit.methods.prompts import p_tuning, p_tuning_v2, prefix_tuning, prompt_tuning  # noqa: F401
from peftkit.methods.prompts.p_tuning import PTuningConfig
from peftkit.methods.prompts.p_tuning_v2 import PTuningV2Config
from peftkit.methods.prompts.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompts.prompt_tuning import PromptTuningConfig

__all__ = ["PTuningConfig", "PTuningV2Config", "PrefixTuningConfig", "PromptTuningConfig"]
