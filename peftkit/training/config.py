"""The settings of a training run: defaults, YAML file, command line; the effective config is saved with
the run so that it can be repeated and resumed."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import peftkit.methods  # (importing the method modules declares them)
import peftkit.qlora  # noqa: F401  (declares qlora)
from peftkit.config import ConfigError
from peftkit.data.core import TASKS, Columns
from peftkit.method_spec import all_options, check_options, method_spec
from peftkit.training.ranges import SETTING_RANGES, check_setting, check_weight_decay_step

# The peak learning rate of a freshly initialised task head, whatever the method: a random linear layer over
# the model's features wants larger steps than an adapter inside the model (see README, "What `make train`
# does", for the measurements behind it).
HEAD_LEARNING_RATE = 1e-2


@dataclass
class TrainConfig:
    """Every setting of a training run. Sizes in examples or tokens, intervals in optimizer steps.

    Construction fills in the method's defaults (its options, its learning rate) and raises ConfigError for
    an unknown method or an option the method does not take, and :meth:`validate` checks every value against
    its range (:data:`~peftkit.training.ranges.SETTING_RANGES`) and the method's options by building its
    adapter config: a bad setting is refused before anything is loaded or written."""

    # what
    model: str = "minilm"
    dataset: str = "rotten_tomatoes"
    task: str | None = None  # inferred for built-in datasets
    method: str = "lora"
    columns: dict[str, str] = field(default_factory=dict)  # e.g. {"text": "review", "label": "sentiment"}
    limit: int | None = None  # records read before splitting (None: all)
    # training examples kept: the first N of the (seeded, shuffled) training split, so a smaller size is a
    # prefix of a larger one (None: all); validation and test stay whole
    train_size: int | None = None
    data_seed: int | None = None  # seed of the split and its order (None: `seed`); fixed, it keeps the data
    # the method's own settings (declared with the method, see peftkit/method_spec.py); the missing ones
    # take the method's defaults, and one the method does not take is refused
    options: dict[str, Any] = field(default_factory=dict)
    # optimisation
    epochs: float = 1.0
    max_steps: int | None = 300
    batch_size: int = 32
    gradient_accumulation: int = 1
    learning_rate: float | None = None  # None: the method's own, see default_learning_rate()
    head_learning_rate: float | None = None  # a fresh task head's peak rate (None: HEAD_LEARNING_RATE)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    max_length: int | None = None  # None: from the training data, see peftkit/training/lengths.py
    bf16: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard the frozen base across the launched processes (FSDP2), see training/fsdp.py
    # causal-LM / seq2seq training (see peftkit/training/efficiency.py)
    fused_loss: bool = True  # the fused linear cross-entropy where it equals the model's own loss
    # batches of similar lengths, keeping each batch's label mix (see training/efficiency.py); None: the rule
    # of runs recorded before this was the default (on for causal-lm and seq2seq only)
    group_by_length: bool | None = True
    packing: bool = False  # several causal-LM examples per row, attention and positions kept apart
    check_finite: bool = True  # stop when a trainable parameter turns NaN or infinite (see divergence.py)
    seed: int = 0
    # evaluation, checkpoints, output
    eval_every: int = 100
    eval_batch_size: int = 64
    eval_limit: int | None = 500  # validation records per evaluation (None: all)
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    save_every: int = 100
    output_dir: str = "runs/train"
    resume: bool = False

    def __post_init__(self) -> None:
        """Fill in the method's defaults: its options and its learning rate. Raises ConfigError for an
        unknown method or an option the method does not take."""
        spec = method_spec(self.method)
        check_options(self.method, self.options)
        self.options = {**spec.defaults(), **self.options}
        if self.learning_rate is None:
            self.learning_rate = default_learning_rate(self.method, self.dataset)
        if self.head_learning_rate is None:
            self.head_learning_rate = HEAD_LEARNING_RATE
        self.validate()

    @property
    def split_seed(self) -> int:
        """The seed of the data split and its order: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    def to_dict(self) -> dict[str, Any]:
        """The settings as one flat mapping (the method's options beside the others), as saved."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k != "options"}
        return {**values, **self.options}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """From a flat mapping (:meth:`to_dict`'s form), None being a real value; validated."""
        general, options = split_settings(values)
        config = cls(**general, options=options)
        config.validate()
        return config

    @staticmethod
    def read_settings(yaml_path: str | Path) -> dict[str, Any]:
        """The flat settings of a YAML file (numbers read as numbers). Raises ConfigError naming the file for
        one that cannot be read, is not valid YAML (with the line and column) or is not a mapping."""
        path = Path(yaml_path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the settings file: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a YAML settings file (not UTF-8 text)") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        bad_keys = [k for k in loaded if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError(f"{path}: setting names must be text, got {bad_keys[0]!r}")
        return loaded

    @classmethod
    def read_checked_settings(cls, yaml_path: str | Path) -> dict[str, Any]:
        """:meth:`read_settings`, each value checked against its setting's range: an error names the file
        and the key (a method option's range is checked when the config is built)."""
        settings = cls.read_settings(yaml_path)
        for name, value in settings.items():
            try:
                check_value(name, value)
            except ConfigError as error:
                raise ConfigError(f"{yaml_path}: {error}") from None
        return settings

    @classmethod
    def from_sources(
        cls,
        yaml_path: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
        *,
        none_is_unset: bool = True,
        base: dict[str, Any] | None = None,
    ) -> TrainConfig:
        """Defaults (or ``base``, a resumed run's recorded settings, in :meth:`to_dict`'s form), then the YAML
        file, then ``overrides`` (which win). With ``none_is_unset`` a None in ``overrides`` means "not
        given"; without it None is a value (``--max-steps none``).

        Raises ConfigError for an unknown setting, a value of the wrong type or out of its range (naming the
        YAML file when the value came from it), an unknown method, or an option of another method."""
        from_file = cls.read_checked_settings(yaml_path) if yaml_path is not None else {}
        values = {**(base or {}), **from_file}
        given = {k: v for k, v in (overrides or {}).items() if v is not None or not none_is_unset}
        values.update(given)
        try:
            return cls.from_dict(values)
        except ConfigError as error:  # a method option the adapter config refuses: name the file it came from
            named = named_setting(error)
            if yaml_path is None or named is None or named in given or named not in from_file:
                raise
            raise ConfigError(f"{yaml_path}: {error}") from None

    def validate(self) -> None:
        """Raise ConfigError naming the first setting out of its range (see
        :data:`~peftkit.training.ranges.SETTING_RANGES`), a bad ``task``, ``columns`` or text setting, or a
        method option its adapter config refuses. Ints given for float settings become floats."""
        for name in SETTING_RANGES:
            setattr(self, name, check_setting(name, getattr(self, name)))
        check_weight_decay_step(max(self.learning_rate, self.head_learning_rate), self.weight_decay)
        for name in ("model", "dataset", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, str | Path) or not str(value).strip():
                raise ConfigError(f"`{name}` must be a non-empty name or path, got {value!r}")
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(
                f"`task` must be one of {', '.join(TASKS)} (or none: inferred), got {self.task!r}"
            )
        check_columns(self.columns)
        method_spec(self.method).build(self.options, [])  # the adapter config checks the method's options

    def save(self, path: Path) -> None:
        """Write the settings to ``path`` as flat YAML (:meth:`to_dict`'s form)."""
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=True))


def default_learning_rate(method: str, dataset: str | None = None) -> float:
    """The peak learning rate a run of ``method`` starts from: the method's own (its declaration), or the one
    a built-in ``dataset`` names for it. Raises ConfigError for an unknown method."""
    from peftkit.data.builtin import BUILTIN_DATASETS

    own = method_spec(method).learning_rate
    builtin = BUILTIN_DATASETS.get(dataset or "")
    return builtin.learning_rates.get(method, own) if builtin is not None else own


def parse_setting(name: str, text: str) -> Any:
    """A command-line string read as setting ``name`` reads it: an int, float or string, ``true`` / ``false``
    for a switch, ``none`` for a setting that may be unset. Raises ConfigError for an unknown setting, a
    string that is not a value of its type, or a value out of the setting's range (see ``SETTING_RANGES``)."""
    options = all_options()
    if name in options:
        option = options[name][0]
        kind, optional = option.kind, option.optional
    else:
        hints = typing.get_type_hints(TrainConfig)
        if name not in hints or name in ("options", "columns"):
            known = sorted(set(hints) - {"options", "columns"} | set(options))
            raise ConfigError(f"unknown setting {name!r}; known: {known}")
        kinds = [a for a in typing.get_args(hints[name]) if a is not type(None)] or [hints[name]]
        kind, optional = kinds[0], type(None) in typing.get_args(hints[name])
    if optional and text.lower() == "none":
        return None
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"`{name}` expects true or false, got {text!r}")
        return text.lower() == "true"
    try:
        value = kind(text)
    except ValueError:
        allowed = (
            SETTING_RANGES[name].allowed() if name in SETTING_RANGES else _ARTICLE.get(kind, kind.__name__)
        )
        raise ConfigError(f"`{name}` must be {allowed}, got {text!r}") from None
    return check_setting(name, value)


def named_setting(error: ConfigError) -> str | None:
    """The setting an error message names first (as `name`), if any."""
    found = re.search(r"`(\w+)`", str(error))
    return found[1] if found else None


def check_value(name: str, value: Any) -> None:
    """Raise ConfigError when ``value`` cannot be setting ``name``: an unknown name, a wrong type or a value
    out of range (a method option's range is its adapter config's business, checked in ``validate``)."""
    general, _ = split_settings({name: value})
    if name in general:
        check_setting(name, general[name])
    if name == "columns":
        check_columns(value)


def check_columns(columns: Any) -> None:
    """Raise ConfigError unless ``columns`` maps column roles (:class:`~peftkit.data.Columns`' fields) to
    non-empty column names."""
    roles = [f.name for f in dataclasses.fields(Columns)]
    if not isinstance(columns, dict):
        raise ConfigError(
            f"`columns` must be a mapping of column roles to the names in your file (roles: {', '.join(roles)};"
            f" e.g. {{text: review, label: sentiment}}), got {columns!r}"
        )
    unknown = sorted(str(k) for k in columns if k not in roles)
    if unknown:
        raise ConfigError(f"unknown column role(s) {unknown} in `columns`; known: {', '.join(roles)}")
    for role, name in columns.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"`columns.{role}` must be a non-empty column name, got {name!r}")


def drop_other_methods_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the options of other methods than its own that hold their default: the
    ``config.yaml`` of a run saved before options belonged to their method lists every method's."""
    spec = method_spec(settings.get("method", "lora"))
    options = all_options()
    return {
        k: v
        for k, v in settings.items()
        if k not in options or k in spec.option_names or v != options[k][0].default
    }


def split_settings(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A flat mapping of settings -> (TrainConfig's own fields, method options), numbers parsed.

    Raises ConfigError for a name that is neither."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"options"}
    options = all_options()
    unknown = sorted(set(values) - fields - set(options))
    if unknown:
        raise ConfigError(f"unknown training setting(s) {unknown}; known: {sorted(fields | set(options))}")
    general = {k: _coerce(k, _NUMERIC.get(k), v) for k, v in values.items() if k in fields}
    chosen = {k: _coerce(k, options[k][0].kind, v) for k, v in values.items() if k in options}
    return general, chosen


def _coerce(name: str, kind: type | None, value: Any) -> Any:
    """YAML 1.1 reads ``3e-5`` (no dot) as a string; numbers for numeric settings are parsed here, with an
    error naming the setting when that fails."""
    if kind not in _ARTICLE or value is None or isinstance(value, bool) or not isinstance(value, str):
        return value
    try:
        return kind(value)
    except ValueError:
        allowed = SETTING_RANGES[name].allowed() if name in SETTING_RANGES else _ARTICLE[kind]
        raise ConfigError(f"`{name}` must be {allowed}, got {value!r}") from None


_ARTICLE = {float: "a number", int: "an integer"}
_NUMERIC = {
    field.name: kind
    for field in dataclasses.fields(TrainConfig)
    for kind in (float, int)
    if kind.__name__ in str(field.type).split(" | ")
}
