"""The runs of a comparison: every method with every seed, on the same model, data and budget."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}"


def plan_runs(
    base: TrainConfig,
    methods: Iterable[str],
    seeds: Iterable[int],
    output_dir: str | Path,
    method_settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[RunSpec]:
    """One run per (method, seed), methods outermost. Each run is ``base`` with the method's own settings
    (``method_settings[method]``), its seed and its folder ``<output_dir>/runs/<method>-seed<seed>``; of
    ``base``'s method options, a run keeps those its method takes.

    Invalid settings do not stop the plan: the run carries the error and is reported as failed."""
    specs = []
    for method in methods:
        for seed in seeds:
            run_dir = Path(output_dir) / RUNS_DIR / f"{method}-seed{seed}"
            try:
                if method not in METHOD_SPECS:
                    raise ConfigError(f"unknown method {method!r}; known: {sorted(METHOD_SPECS)}")
                shared = {k: v for k, v in base.options.items() if k in method_spec(method).option_names}
                values = {
                    **{k: v for k, v in base.to_dict().items() if k not in base.options},
                    **shared,
                    **dict((method_settings or {}).get(method, {})),
                    "method": method,
                    "seed": seed,
                    "output_dir": str(run_dir),
                    "resume": False,
                }
                # not TrainConfig.from_sources: it reads None as "not given", and None is a real value here
                # (``max_steps: None`` runs whole epochs, ``target_modules: None`` the architecture's default)
                specs.append(RunSpec(method, seed, run_dir, TrainConfig.from_dict(values)))
            except (ConfigError, TypeError, ValueError) as error:
                specs.append(RunSpec(method, seed, run_dir, None, f"{type(error).__name__}: {error}"))
    return specs
