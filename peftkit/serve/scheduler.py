"""Continuous batching: one thread owns the model and runs one decode batch; requests join and leave it
between steps.

Each turn of the loop: run the control operations clients asked for (load or remove an adapter) at the step
boundary, admit waiting requests while the batch has room (those waiting are prefilled together in one mixed
batch, each row through its adapter; prompt-method adapters one at a time; each gives its first token and
its cache joins the batch), then one decode step for every row; rows that ended
(end of sequence, ``max_tokens``, a stop string, the context's end) or whose client went away leave. This is
iteration-level scheduling as in Orca (Yu et al., OSDI 2022) and vLLM, with per-row adapters as in Punica
and S-LoRA: rows of different adapters and of the base model share each step.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from peftkit.serve.batch import Runner
from peftkit.serve.kv import BatchCache
from peftkit.serve.metrics import Metrics
from peftkit.serve.registry import Registry
from peftkit.serve.sampling import next_tokens
from peftkit.serve.sequence import Sequence

CLASSIFY_ROWS_PER_DECODE_ROW = 4  # a classification pass may hold this many times --max-batch-size rows


class QueueFull(RuntimeError):
    """More requests are waiting than ``max_queue`` allows (HTTP 429)."""


class Scheduler:
    def __init__(
        self,
        runner: Runner,
        registry: Registry,
        metrics: Metrics,
        *,
        base_name: str,
        max_batch_size: int = 16,
        max_queue: int = 256,
    ) -> None:
        self.runner = runner
        self.registry = registry
        self.metrics = metrics
        self.base_name = base_name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.controls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = (
            collections.deque()
        )
        self.classify_jobs: collections.deque = collections.deque()  # waiting POST /v1/classify requests
        self.classifier = None  # set by the engine: runs a list of classify jobs in shared passes
        self.rows: list[Sequence] = []
        self.cache = BatchCache(max_batch_size)
        self._wake = threading.Condition()
        self._stopping = False
        self._loads_counted = 0
        self._thread = threading.Thread(target=self._loop, name="peftkit-scheduler", daemon=True)

    # --- any thread -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, sequence: Sequence) -> None:
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(sequence)
            self.metrics.queue_length.set(len(self.waiting))
            self._wake.notify()

    def submit_classify(self, job) -> None:
        """Queue a classification request; all waiting ones run together at the next step boundary."""
        with self._wake:
            if len(self.waiting) + len(self.classify_jobs) >= self.max_queue:
                raise QueueFull(
                    f"{len(self.waiting) + len(self.classify_jobs)} requests are waiting (--max-queue {self.max_queue})"
                )
            self.classify_jobs.append(job)
            self._wake.notify()

    def call(self, function: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``function`` on the scheduler's thread between two steps; its result or error in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self.controls.append((function, future))
            self._wake.notify()
        return future

    # --- the scheduler's thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        # inference mode: no autograd bookkeeping (version counters, view tracking) on the thousands of ops of
        # a step; adapter loads step out of it (see _loading), since they create parameters
        with torch.inference_mode():
            while True:
                with self._wake:
                    if not (
                        self.rows or self.waiting or self.controls or self.classify_jobs or self._stopping
                    ):
                        self._wake.wait(timeout=1.0)
                    if self._stopping:
                        break
                self._run_controls()
                self._classify()
                self._admit()
                if self.rows:
                    self._step()

    def _run_controls(self) -> None:
        while self.controls:
            function, future = self.controls.popleft()
            try:
                with torch.inference_mode(False):  # loads and removals change the model's parameters
                    future.set_result(function())
            except Exception as error:  # handed to the waiting request
                future.set_exception(error)

    def _classify(self) -> None:
        """Waiting classification requests, in passes shared across adapters: about one pass worth of rows
        per turn, so that a large request does not hold the running decode batch for long."""
        limit, jobs, rows = self.max_batch_size * CLASSIFY_ROWS_PER_DECODE_ROW, [], 0
        with self._wake:
            while self.classify_jobs and rows < limit:
                jobs.append(self.classify_jobs.popleft())
                rows += len(jobs[-1].ids)
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]  # clients still there
        if jobs:
            self.classifier.run(jobs, max_rows=limit)

    def _admit(self) -> None:
        """Prefill waiting requests while the batch has room and join them to it."""
        admitted = []
        while self.waiting and len(self.rows) + len(admitted) < self.max_batch_size:
            with self._wake:
                sequence = self.waiting.popleft()
                self.metrics.queue_length.set(len(self.waiting))
            if sequence.cancelled:
                self._finish(sequence, "cancelled")
                continue
            try:
                self._acquire(sequence)
            except Exception as error:  # unknown or busy adapter, a file that no longer loads
                sequence.fail(error)
                self._finish(sequence, "error")
                continue
            admitted.append(sequence)
        together = [s for s in admitted if self._adapter(s) not in self.registry.input_methods]
        alone = [[s] for s in admitted if self._adapter(s) in self.registry.input_methods]
        for group in ([together] if together else []) + alone:
            self._prefill(group)
        self.metrics.batch_size.set(len(self.rows))

    def _adapter(self, sequence: Sequence) -> str | None:
        return None if sequence.adapter == self.base_name else sequence.adapter

    def _prefill(self, group: list[Sequence]) -> None:
        try:
            logits, cache = self.runner.prefill(group, [self._adapter(s) for s in group])
            tokens = next_tokens(logits, [s.params for s in group], [s.generator for s in group])
        except Exception as error:  # a model error ends these requests, not the server
            for sequence in group:
                sequence.fail(error)
                self._finish(sequence, "error")
            return
        first = len(self.rows)
        self.cache.join(cache, [s.length for s in group])
        self.rows += group
        ended = set()
        for index, (sequence, token) in enumerate(zip(group, tokens, strict=True)):
            self.metrics.prompt_tokens.labels(sequence.adapter).inc(len(sequence.prompt_ids))
            if sequence.add_token(token):
                self._finish(sequence, "ok")
                ended.add(first + index)
        if ended:
            kept = [i for i in range(len(self.rows)) if i not in ended]
            self.rows = [self.rows[i] for i in kept]
            self.cache.keep(kept)

    def _step(self) -> None:
        try:
            tokens = self.runner.decode(self.rows, self.cache)
        except Exception as error:  # a model error ends the batch's requests, not the server
            for row in self.rows:
                row.fail(error)
                self._finish(row, "error")
            self.rows, self.cache = [], BatchCache(self.max_batch_size)
            return
        self.metrics.decode_steps.inc()
        kept = []
        for index, (row, token) in enumerate(zip(self.rows, tokens, strict=True)):
            if row.cancelled:
                self._finish(row, "cancelled")
            elif row.add_token(token):
                self._finish(row, "ok")
            else:
                kept.append(index)
        if len(kept) < len(self.rows):
            self.rows = [self.rows[i] for i in kept]
            self.cache.keep(kept)
        self.metrics.batch_size.set(len(self.rows))

    def _acquire(self, sequence: Sequence) -> None:
        if sequence.adapter != self.base_name:
            with torch.inference_mode(False):  # a load creates parameters: not inference tensors
                self.registry.acquire(sequence.adapter)
            sequence.holds_adapter = True
            self.metrics.resident_adapters.set(len(self.registry.resident))
            self.metrics.adapter_loads.inc(self.registry.loads - self._loads_counted)
            self._loads_counted = self.registry.loads

    def _finish(self, sequence: Sequence, outcome: str) -> None:
        if sequence.holds_adapter:
            sequence.holds_adapter = False
            self.registry.release(sequence.adapter)
        self.metrics.finished(
            sequence.adapter,
            outcome,
            sequence.arrived,
            sequence.first_token_at,
            time.perf_counter(),
            len(sequence.generated),
        )
