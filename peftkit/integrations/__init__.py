"""peftkit inside transformers' ``Trainer`` and TRL.

``from peftkit.integrations import PeftkitTrainer`` (``Trainer`` that saves and resumes only the adapter),
``PeftkitTrainerMixin`` and ``peftkit_trainer_class(MyTrainer)`` for other ``Trainer`` subclasses;
``peftkit.integrations.trl.PeftkitSFTTrainer`` for TRL. Imported
lazily: ``peftkit`` itself does not import ``transformers.Trainer``.
"""

from typing import Any

__all__ = ["PeftkitTrainer", "PeftkitTrainerMixin", "peftkit_trainer_class"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from peftkit.integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'peftkit.integrations' has no attribute {name!r}")
