"""What ``--resume`` accepts: the run's own settings, a whole checkpoint, and local paths that mean one thing.

A resumed run continues the run its folder records, so that ``config.yaml`` keeps describing what was done.
Only the settings in :data:`MAY_CHANGE_ON_RESUME` may differ from the recorded ones: how long to train (more
steps or epochs; the linear decay is then recomputed for the new total, as a run of that length has it),
how often and on how much to evaluate and checkpoint, when to stop early, and switches that change memory or
time but not the result (gradient checkpointing, the fused loss, the finiteness check, FSDP sharding). Any other difference
(the model, data, method and its options, batch size, accumulation, learning rate and schedule, precision,
sequence length, data order, seed) would train something else than the checkpoint was trained for, and is
refused with the list of differences.

Local paths are recorded absolute (``--model ./m`` -> ``/home/u/m``), so that ``peftkit eval RUN`` and
``--resume`` mean the same files from any working directory; built-in names stay names.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftkit.config import ConfigError
from peftkit.method_spec import method_spec
from peftkit.training.config import TrainConfig
from peftkit.training.layout import RunFolder

MAY_CHANGE_ON_RESUME = frozenset(
    {
        "max_steps",
        "epochs",
        "eval_every",
        "eval_batch_size",
        "eval_limit",
        "early_stopping_patience",
        "save_every",
        "gradient_checkpointing",
        "fused_loss",
        "check_finite",
        "fsdp",
        "output_dir",
        "resume",
    }
)


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with ``model`` and ``dataset`` made absolute where they name an existing local folder or
    file (as :func:`peftkit.assets.resolve_model` and :func:`peftkit.data.load_records` read them); a
    built-in name, or a path that does not exist (reported when loaded), is kept as given."""
    model, dataset = Path(config.model).expanduser(), Path(config.dataset).expanduser()
    return dataclasses.replace(
        config,
        model=os.path.abspath(model) if model.is_dir() else config.model,
        dataset=os.path.abspath(dataset) if dataset.exists() else config.dataset,
    )


def recorded_settings(folder: RunFolder) -> TrainConfig:
    """The settings ``folder``'s run was trained with, for a resume. Raises ConfigError when the folder holds
    no run, or a run without a checkpoint to continue from."""
    if not folder.root.is_dir() or folder.is_empty():
        raise ConfigError(
            f"--resume: {folder.root} is empty or does not exist, so there is no run to resume; "
            "train without --resume to start one"
        )
    if not folder.config_path.is_file():
        raise ConfigError(
            f"--resume: {folder.root} is not a peftkit run folder ({folder.config_path.name} is missing); "
            "give the --output-dir of an earlier `peftkit train` run, or train without --resume"
        )
    if not folder.checkpoints():
        raise ConfigError(
            f"--resume: {folder.root} holds no checkpoint to continue from (a run stopped before its first "
            "one, or whose checkpoints were removed); train without --resume, into another --output-dir if "
            "it holds an adapter you want to keep"
        )
    return with_absolute_paths(folder.read_config())


def recorded_base(yaml_path: str | Path | None, overrides: dict[str, Any]) -> dict[str, Any] | None:
    """For a resume (``resume`` given by the flags ``overrides`` or the YAML file): the run's recorded
    settings, to stand in for the defaults, so that every setting the user did not give is the run's own and
    only those given are compared by :func:`check_same_run`; None when not resuming. The recorded options of
    another method than a given ``method`` are left out (the difference of method is then what is refused).
    Raises ConfigError (see :func:`recorded_settings`) when the folder holds no run to resume."""
    given = {**(TrainConfig.read_checked_settings(yaml_path) if yaml_path is not None else {}), **overrides}
    if not given.get("resume"):
        return None
    output_dir = given.get("output_dir") or TrainConfig.output_dir
    recorded = recorded_settings(RunFolder(output_dir))
    method = given.get("method", recorded.method)
    # the folder read is the one written (a moved run folder records where it was)
    base = {**recorded.to_dict(), "output_dir": str(output_dir)}
    if method == recorded.method:
        return base
    dropped = set(recorded.options) - set(method_spec(method).option_names)
    return {k: v for k, v in base.items() if k not in dropped}


def check_same_run(recorded: TrainConfig, wanted: TrainConfig, folder: RunFolder) -> dict[str, list]:
    """The settings that differ between the recorded run and the resumed one, all in
    :data:`MAY_CHANGE_ON_RESUME` (``{name: [recorded, wanted]}``). Raises ConfigError listing every other
    difference (recorded -> wanted) and what to do."""
    old, new = _plain(recorded.to_dict()), _plain(wanted.to_dict())
    keys = sorted(old.keys() | new.keys())
    changed = {
        k: [old.get(k, _UNSET), new.get(k, _UNSET)] for k in keys if old.get(k, _UNSET) != new.get(k, _UNSET)
    }
    refused = {k: v for k, v in changed.items() if k not in MAY_CHANGE_ON_RESUME}
    if refused:
        lines = "\n".join(f"  {k}: {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"--resume: these settings differ from the run recorded in {folder.config_path}:\n{lines}\n"
            "A resumed run continues that run: give the recorded values (or leave these settings out), "
            "or train the new settings into another --output-dir. On resume only these may change: "
            f"{', '.join(sorted(MAY_CHANGE_ON_RESUME - {'resume', 'output_dir'}))}."
        )
    return {k: v for k, v in changed.items() if k not in ("resume", "output_dir")}


def check_world_size(state: dict[str, Any], world_size: int, checkpoint: Path) -> None:
    """Raise ConfigError naming both when the checkpoint's trainer ``state`` records another number of
    processes than ``world_size``: the global batch (batch size x processes x accumulation) and the data
    order would change under the resumed steps. A checkpoint that records none is not checked."""
    recorded = state.get("world_size")
    if recorded is not None and recorded != world_size:
        raise ConfigError(
            f"--resume: {checkpoint} was written by a run of {recorded} process(es), and this one has "
            f"{world_size}: the global batch (batch size x processes x accumulation steps) would change. "
            f"Resume it with {recorded} process(es), or train the new setup into another --output-dir"
        )


def restore_checkpoint(
    folder: RunFolder, model, say: Callable[[str], None], world_size: int = 1
) -> tuple[Path, dict[str, Any]]:
    """The newest whole checkpoint's trainer state, with its adapter weights put into ``model``'s
    ``default`` adapter; a damaged one (unreadable or incomplete trainer state, missing or damaged adapter
    files, non-finite weights) is passed over for the one before it, with a message through ``say``. Raises
    ConfigError naming each bad file when no checkpoint is whole, and (:func:`check_world_size`) when the
    checkpoint was written by another number of processes than ``world_size``."""
    problems = []
    for checkpoint in folder.checkpoints():
        try:
            state = folder.load_trainer_state(checkpoint)
            # checked from the header (and for finiteness) before anything is written into the model
            model.load_adapter_weights(RunFolder.checkpoint_adapter(checkpoint), "default")
        except (ValueError, OSError) as error:  # CheckpointError, ConfigError, an unreadable file
            problems.append(str(error))
            continue
        check_world_size(state, world_size, checkpoint)
        if problems:
            say(
                f"the latest checkpoint is damaged ({'; '.join(problems)}): resuming from the one before it, "
                f"{checkpoint} (step {state['progress']['step']})"
            )
        return checkpoint, state
    raise ConfigError(f"--resume: no whole checkpoint in {folder.root}: {'; '.join(problems)}")


def _plain(value: Any) -> Any:
    """Tuples as lists (YAML reads both as lists), so a recorded value equals the one given."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


_UNSET = "(not a setting of this method)"


def _show(value: Any) -> str:
    return value if value is _UNSET else repr(value)
