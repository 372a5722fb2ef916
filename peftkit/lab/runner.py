"""Run one planned run in its own process and wait for it, reporting its steps as they are logged."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftkit.lab.plan import RunSpec
from peftkit.training.layout import RunFolder
from peftkit.training.resume import with_absolute_paths

POLL_SECONDS = 0.5
BASE_RETAINED = "retained_base.json"  # the base model's retained ability, next to the tables


def launch(
    spec: RunSpec,
    on_steps: Callable[[int], None] = lambda steps: None,
    latency_batch: int = 16,
    latency_repeats: int = 20,
    timeout: float | None = None,
    retain: dict[str, Any] | None = None,
    test_limit: int | None = None,
) -> dict[str, Any]:
    """Train ``spec`` in a fresh ``python -m peftkit.lab.worker`` process (scoring its retained ability on
    ``retain`` = ``{"text", "tokens", "length"}`` when given); its result, or a failure with the error (and
    the end of the worker's log when it died without a word)."""
    if spec.config is None:
        return {"status": "failed", "error": spec.error}
    folder = RunFolder(spec.run_dir)
    folder.clear()
    folder.save_config(spec.config)
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
    if test_limit is not None:
        command += ["--test-limit", str(test_limit)]
    if retain is not None:
        command += ["--retain-text", str(retain["text"]), "--retain-tokens", str(retain["tokens"])]
        command += ["--retain-length", str(retain["length"])]
    started = time.monotonic()
    loads = []  # the machine's 1-minute load average while the run lasts: was the CPU shared?
    with folder.worker_log.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while process.poll() is None:
                if timeout is not None and time.monotonic() - started > timeout:
                    process.kill()
                    process.wait()
                    return {"status": "failed", "error": f"timed out after {timeout:.0f} s"}
                on_steps(folder.steps_logged())
                loads.append(os.getloadavg()[0])
                time.sleep(POLL_SECONDS)
        except BaseException:  # Ctrl-C: no orphaned worker keeps training
            process.kill()
            process.wait()
            raise
    on_steps(folder.steps_logged())
    record = folder.read_lab_record()
    if record is not None:
        record["load_average"] = statistics.fmean(loads) if loads else None
        folder.write_lab_record(record)  # complete, so that --resume can reuse it as is
        return record
    return {
        "status": "failed",
        "error": f"the worker exited with status {process.returncode} without a result; "
        f"log ends: {_tail(folder.worker_log)}",
    }


def finished_result(
    spec: RunSpec, retain: dict[str, Any] | None = None, test_limit: int | None = None
) -> dict[str, Any] | None:
    """The record of an earlier run of exactly this spec (``--resume``): its worker succeeded, the settings
    it saved are the planned ones, its folder aside, and it scored retention on the same ``retain`` text
    and sizes (or neither did) and on the same ``test_limit``. Anything else (failed, interrupted, other settings) is run again."""
    folder = RunFolder(spec.run_dir)
    record = folder.read_lab_record()
    if (
        spec.config is None
        or record is None
        or record.get("status") != "ok"
        or not folder.config_path.is_file()
        or (record.get("retained") or {}).get("settings") != retain
        or record.get("test_limit") != test_limit
    ):
        return None
    saved = with_absolute_paths(folder.read_config()).to_dict()  # a run records its local paths absolute
    planned = with_absolute_paths(spec.config).to_dict()
    for location in ("output_dir", "resume"):
        saved.pop(location, None), planned.pop(location, None)
    if planned.get("max_length") is None:  # to be chosen from the data: a run records the length it chose
        saved["max_length"] = None
    return record if saved == planned else None


def _tail(path: Path, characters: int = 400) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return " ".join(text[-characters:].split())


def base_retention(
    specs: list[RunSpec], records: list, output_dir: Path, retain: dict[str, Any], resume: bool
) -> dict[str, Any] | None:
    """The base model's retained ability on ``retain``'s text (see :mod:`peftkit.lab.retain`), scored once
    in a process of its own from the first successful run's settings (its model, task, quantization) and
    kept in ``output_dir / BASE_RETAINED`` (reused by ``resume`` when it measured the same). None when no
    run succeeded; a failure is returned as ``{"measure": None, "note": error}``."""
    path = Path(output_dir) / BASE_RETAINED
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == retain:
            return saved
    done = next((s for s, r in zip(specs, records, strict=True) if r.ok), None)
    if done is None:
        return None
    path.unlink(missing_ok=True)
    log = Path(output_dir) / "retained_base.log"
    command = [sys.executable, "-m", "peftkit.lab.retain", str(done.run_dir), str(retain["text"]), str(path)]
    command += ["--tokens", str(retain["tokens"]), "--length", str(retain["length"])]
    with log.open("w") as handle:
        status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    if status != 0 or not path.is_file():
        return {"measure": None, "note": f"scoring the base model failed: {_tail(log)}", "settings": retain}
    return json.loads(path.read_text())
