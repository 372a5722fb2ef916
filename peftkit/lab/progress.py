"""One progress bar over the whole comparison: which method and seed runs now, and the time left for all.

The bar counts optimizer steps over every run (read from each run's ``metrics.jsonl`` as it grows), so the
ETA covers the runs still to come; when a run's length is not known ahead (``max_steps: none``), it counts
runs instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from peftkit.lab.plan import RunSpec


class ComparisonProgress:
    def __init__(self, specs: Sequence[RunSpec], disable: bool = False) -> None:
        self.by_steps = all(s.config is None or s.config.max_steps for s in specs)
        self.sizes = [
            (s.config.max_steps if s.config is not None else 0) if self.by_steps else 1 for s in specs
        ]
        self.count = len(specs)
        self.bar = tqdm(
            total=sum(self.sizes),
            unit="step" if self.by_steps else "run",
            desc="compare",
            disable=disable,
            dynamic_ncols=True,
            mininterval=0.5,
            smoothing=0,  # ETA from the average rate so far, loading and evaluation included
        )
        self.done_before = 0  # units of the finished runs
        self.failed = 0

    def start(self, index: int, spec: RunSpec) -> None:
        """Run ``index`` (``spec``) begins: named on the bar."""
        self.bar.set_description(f"compare [{index + 1}/{self.count}] {spec.method} seed {spec.seed}")
        self._refresh_postfix()

    def steps_done(self, index: int, steps: int) -> None:
        """Run ``index`` has logged ``steps`` optimizer steps so far."""
        if self.by_steps:
            self._move_to(self.done_before + min(steps, self.sizes[index]))

    def reused(self, index: int) -> None:
        """A run kept from an earlier comparison (``--resume``) leaves the total: the rate, and so the ETA,
        counts only the steps trained now."""
        self.bar.total -= self.sizes[index]
        self.sizes[index] = 0
        self.bar.refresh()

    def finish(self, index: int, ok: bool) -> None:
        """Run ``index`` ended (``ok``: succeeded); its whole share of the bar is done."""
        self.done_before += self.sizes[index]
        self._move_to(self.done_before)
        self.failed += not ok
        self._refresh_postfix()

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()

    def _move_to(self, position: int) -> None:
        if position > self.bar.n:
            self.bar.update(position - self.bar.n)

    def _refresh_postfix(self) -> None:
        if self.failed:
            self.bar.set_postfix(failed=self.failed)
