"""Small `peftkit train` runs for the run-folder tests: a tiny BERT, a sentiment CSV, a few steps."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from peftkit.training.config import TrainConfig
from tests import pipeline_fixtures as fx

PEFTKIT = [sys.executable, "-m", "peftkit.cli.main"]
QUIET = lambda *_: None  # noqa: E731


def make_assets(root: Path) -> dict[str, Path]:
    return {
        "bert": fx.tiny_bert(root / "bert"),
        "sentiment": fx.sentiment_csv(root / "reviews.csv", rows=120),
    }


def settings(assets, out, **overrides) -> dict:
    values = dict(
        model=str(assets["bert"]),
        dataset=str(assets["sentiment"]),
        task="sequence-classification",
        columns={"text": "review", "label": "sentiment"},
        limit=None,
        max_steps=4,
        batch_size=8,
        learning_rate=1e-2,
        target_modules="all-linear",
        eval_every=2,
        save_every=2,
        eval_limit=16,
        dropout=0.0,
        output_dir=str(out),
        max_length=16,
    )
    values.update(overrides)
    return values


def config(assets, out, **overrides) -> TrainConfig:
    return TrainConfig.from_sources(None, settings(assets, out, **overrides))


def finished_run(tmp_path_factory, assets, **overrides) -> Path:
    """A finished run of :func:`config` with ``overrides``, trained in a fresh folder of the test session."""
    from peftkit.training.loop import train

    out = tmp_path_factory.mktemp("runs") / "run"
    train(config(assets, out, **overrides), log=QUIET)
    return out


def cli_flags(assets, out, **overrides) -> list[str]:
    """The same run as command-line flags of `peftkit train`."""
    values = settings(assets, out, **overrides)
    columns = values.pop("columns")
    flags = [f"--{k.replace('_', '-')}" for k in ("text_column", "label_column")]
    args = [flags[0], columns["text"], flags[1], columns["label"]]
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            args += [flag, "none" if value is None else str(value)]
    return args


def wait_for(condition, seconds: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Poll ``condition`` until it holds; fail after ``seconds`` or when ``process`` ended first."""
    deadline = time.monotonic() + seconds
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"the process ended first: {process.stderr.read() if process.stderr else ''}"
            )
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)
