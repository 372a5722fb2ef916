"""Run one planned run in its own process and wait for it, reporting its steps as they are logged."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftkit.lab.plan import RunSpec
from peftkit.lab.worker import RESULT_FILE, write_result
from peftkit.training.config import TrainConfig

LOG_FILE = "worker.log"
POLL_SECONDS = 0.5


def launch(
    spec: RunSpec,
    on_steps: Callable[[int], None] = lambda steps: None,
    latency_batch: int = 16,
    latency_repeats: int = 20,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Train ``spec`` in a fresh ``python -m peftkit.lab.worker`` process; its result, or a failure with
    the error (and the end of the worker's log when it died without a word)."""
    if spec.config is None:
        return {"status": "failed", "error": spec.error}
    if spec.run_dir.exists():
        shutil.rmtree(spec.run_dir)
    spec.run_dir.mkdir(parents=True)
    spec.config.save(spec.run_dir / "config.yaml")
    command = [
        sys.executable,
        "-m",
        "peftkit.lab.worker",
        str(spec.run_dir),
        "--latency-batch",
        str(latency_batch),
        "--latency-repeats",
        str(latency_repeats),
    ]
    started = time.monotonic()
    loads = []  # the machine's 1-minute load average while the run lasts: was the CPU shared?
    with (spec.run_dir / LOG_FILE).open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while process.poll() is None:
                if timeout is not None and time.monotonic() - started > timeout:
                    process.kill()
                    process.wait()
                    return {"status": "failed", "error": f"timed out after {timeout:.0f} s"}
                on_steps(_logged_steps(spec.run_dir))
                loads.append(os.getloadavg()[0])
                time.sleep(POLL_SECONDS)
        except BaseException:  # Ctrl-C: no orphaned worker keeps training
            process.kill()
            process.wait()
            raise
    on_steps(_logged_steps(spec.run_dir))
    result_path = spec.run_dir / RESULT_FILE
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        result["load_average"] = statistics.fmean(loads) if loads else None
        write_result(spec.run_dir, result)  # complete, so that --resume can reuse it as is
        return result
    return {
        "status": "failed",
        "error": f"the worker exited with status {process.returncode} without a result; "
        f"log ends: {_tail(spec.run_dir / LOG_FILE)}",
    }


def finished_result(spec: RunSpec) -> dict[str, Any] | None:
    """The result of an earlier run of exactly this spec (``--resume``): its worker succeeded and the settings
    it saved are the planned ones, its folder aside. Anything else (failed, interrupted, other settings) is
    run again."""
    result_path, config_path = spec.run_dir / RESULT_FILE, spec.run_dir / "config.yaml"
    if spec.config is None or not (result_path.is_file() and config_path.is_file()):
        return None
    result = json.loads(result_path.read_text())
    if result.get("status") != "ok":
        return None
    saved = TrainConfig.from_sources(config_path).to_dict()
    planned = spec.config.to_dict()
    for location in ("output_dir", "resume"):
        saved.pop(location, None), planned.pop(location, None)
    return result if saved == planned else None


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return path.read_text().count('"kind": "train"')


def _tail(path: Path, characters: int = 400) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return " ".join(text[-characters:].split())
