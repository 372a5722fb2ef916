"""The runs of a comparison: every method with every seed (and every training-set size), on the same model,
data and budget.

Low-data comparisons (``train_sizes``): each size is the first N records of one seeded shuffle of the
training split (``data_seed``, the same for every method and seed, so the subsets are nested and validation
and test never change), and the budget grows with the size: ``steps = ceil(epochs x N / global batch)``,
clamped to ``[min_steps, max_steps]`` (:func:`steps_for_size`): a small set is seen for several epochs, never
fewer than ``min_steps`` steps, and a large one is cut at the usual ceiling."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.config import ConfigError
from peftkit.method_spec import METHOD_SPECS, method_spec
from peftkit.training.config import TrainConfig

RUNS_DIR = "runs"


@dataclass
class RunSpec:
    method: str
    seed: int
    run_dir: Path
    config: TrainConfig | None  # None when the settings themselves are invalid
    error: str | None = None  # why the run cannot start
    train_size: int | None = None  # training examples kept (None: the whole training split)

    @property
    def name(self) -> str:
        return run_name(self.method, self.seed, self.train_size)


DEFAULT_DATA_SEED = 0  # the split of a low-data comparison when none is given: one for all runs


def run_name(method: str, seed: int, train_size: int | None = None) -> str:
    """``lora-seed0``, or ``lora-n300-seed0`` for a run on 300 training examples."""
    return f"{method}-seed{seed}" if train_size is None else f"{method}-n{train_size}-seed{seed}"


def steps_for_size(size: int, global_batch: int, epochs: float, min_steps: int, max_steps: int | None) -> int:
    """Optimizer steps for ``size`` training examples: ``ceil(epochs * size / global_batch)``, at least
    ``min_steps`` and at most ``max_steps`` (None: no ceiling). Raises ConfigError for a non-positive value."""
    if size <= 0 or global_batch <= 0 or epochs <= 0 or min_steps <= 0:
        raise ConfigError(
            f"the low-data budget needs positive sizes, batch, epochs and --min-steps, got size {size}, "
            f"batch {global_batch}, epochs {epochs}, min steps {min_steps}"
        )
    if max_steps is not None and max_steps < min_steps:
        raise ConfigError(f"--max-steps ({max_steps}) must be at least --min-steps ({min_steps})")
    steps = max(min_steps, math.ceil(epochs * size / global_batch))
    return steps if max_steps is None else min(steps, max_steps)


def plan_runs(
    base: TrainConfig,
    methods: Iterable[str],
    seeds: Iterable[int],
    output_dir: str | Path,
    method_settings: Mapping[str, Mapping[str, Any]] | None = None,
    train_sizes: Sequence[int] | None = None,
    min_steps: int = 20,
) -> list[RunSpec]:
    """One run per (method, size, seed): methods outermost without sizes, seeds outermost with them. Each run is ``base`` with the
    method's own settings (``method_settings[method]``), its seed and its folder
    ``<output_dir>/runs/<method>[-n<size>]-seed<seed>``; of ``base``'s method options, a run keeps those its
    method takes. With ``train_sizes``, a run keeps the first N training records of the split of
    ``base.data_seed`` (default :data:`DEFAULT_DATA_SEED`) and trains :func:`steps_for_size` steps
    (``base.epochs``, ``min_steps``, ``base.max_steps`` as the ceiling).

    Invalid settings do not stop the plan: the run carries the error and is reported as failed."""
    sized = _size_settings(base, train_sizes, min_steps)
    if not train_sizes:
        return [
            spec
            for method in methods
            for spec in _plan_method(base, method, seeds, output_dir, method_settings, None, {})
        ]
    # low data: seeds outermost, so that a comparison cut short has every method and size of its first seeds
    return [
        spec
        for seed in seeds
        for size, per_size in sized
        for method in methods
        for spec in _plan_method(base, method, [seed], output_dir, method_settings, size, per_size)
    ]


def _size_settings(base, train_sizes, min_steps) -> list[tuple[int | None, dict[str, Any]]]:
    """(size, the settings a run of that size changes) for each size; ``[(None, {})]`` without sizes."""
    if not train_sizes:
        return [(None, {})]
    if any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in train_sizes):
        raise ConfigError(f"--train-sizes must be positive integers, got {list(train_sizes)}")
    if len(set(train_sizes)) != len(train_sizes):
        raise ConfigError(f"--train-sizes repeats a size: {list(train_sizes)}")
    data_seed = DEFAULT_DATA_SEED if base.data_seed is None else base.data_seed
    batch = base.batch_size * base.gradient_accumulation
    return [
        (
            n,
            {
                "train_size": n,
                "data_seed": data_seed,
                "max_steps": steps_for_size(n, batch, base.epochs, min_steps, base.max_steps),
            },
        )
        for n in sorted(train_sizes)
    ]


def _plan_method(base, method, seeds, output_dir, method_settings, size, per_size) -> list[RunSpec]:
    """The runs of one method at one size (None: the whole split), one per seed."""
    specs = []
    for seed in seeds:
        run_dir = Path(output_dir) / RUNS_DIR / run_name(method, seed, size)
        try:
            if method not in METHOD_SPECS:
                raise ConfigError(f"unknown method {method!r}; known: {sorted(METHOD_SPECS)}")
            shared = {k: v for k, v in base.options.items() if k in method_spec(method).option_names}
            values = {
                **{k: v for k, v in base.to_dict().items() if k not in base.options},
                **shared,
                **dict((method_settings or {}).get(method, {})),
                **per_size,
                "method": method,
                "seed": seed,
                "output_dir": str(run_dir),
                "resume": False,
            }
            # not TrainConfig.from_sources: it reads None as "not given", and None is a real value here
            # (``max_steps: None`` runs whole epochs, ``target_modules: None`` the architecture's default)
            specs.append(RunSpec(method, seed, run_dir, TrainConfig.from_dict(values), train_size=size))
        except (ConfigError, TypeError, ValueError) as error:
            error_text = f"{type(error).__name__}: {error}"
            specs.append(RunSpec(method, seed, run_dir, None, error_text, train_size=size))
    return specs
