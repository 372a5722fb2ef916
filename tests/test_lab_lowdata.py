"""`peftkit compare --train-sizes`: nested training subsets, the same for every method and seed, a budget
that grows with the size, and the low-data table and chart."""

import json
import math
import statistics

import pytest

from peftkit.config import ConfigError
from peftkit.data import DataError
from peftkit.lab import run_comparison
from peftkit.lab.plan import DEFAULT_DATA_SEED, plan_runs, steps_for_size
from peftkit.training.config import TrainConfig
from peftkit.training.run import TrainingRun
from tests import pipeline_fixtures as fx

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab-lowdata")
    return {"bert": fx.tiny_bert(root / "bert"), "sentiment": fx.sentiment_csv(root / "reviews.csv")}


def _settings(assets):
    return dict(
        model=str(assets["bert"]),
        dataset=str(assets["sentiment"]),
        task="sequence-classification",
        columns={"text": "review", "label": "sentiment"},
        batch_size=8,
        epochs=2.0,
        max_steps=6,
        learning_rate=1e-2,
        eval_every=100,
        save_every=100,
        eval_limit=8,
        max_length=16,
    )


def _base(assets, **overrides):
    return TrainConfig.from_sources(None, {**_settings(assets), "dropout": 0.0, **overrides})


def test_budget_is_epochs_over_the_size_clamped_to_the_floor_and_the_ceiling():
    # ceil(2 x 100 / 16) = 13 steps; the floor lifts a tiny set, the ceiling cuts a large one
    assert steps_for_size(100, 16, 2.0, 10, 40) == 13
    assert steps_for_size(30, 16, 2.0, 10, 40) == 10
    assert steps_for_size(3000, 16, 2.0, 10, 40) == 40
    assert steps_for_size(3000, 16, 2.0, 10, None) == 375  # no ceiling
    assert steps_for_size(17, 8, 1.0, 1, None) == 3  # rounded up: every example seen once
    with pytest.raises(ConfigError, match="--min-steps"):
        steps_for_size(100, 16, 2.0, 50, 40)
    with pytest.raises(ConfigError, match="positive"):
        steps_for_size(0, 16, 2.0, 10, 40)


def test_plan_gives_every_method_and_seed_the_same_sizes_split_and_budget(assets, tmp_path):
    specs = plan_runs(
        _base(assets), ["lora", "full"], [0, 1], tmp_path, {}, train_sizes=[60, 20], min_steps=2
    )
    assert len(specs) == 2 * 2 * 2 and len({s.run_dir for s in specs}) == len(specs)
    assert [(s.seed, s.train_size, s.method) for s in specs[:4]] == [
        (0, 20, "lora"),
        (0, 20, "full"),
        (0, 60, "lora"),
        (0, 60, "full"),
    ]  # seeds outermost: a comparison cut short holds whole seeds
    for spec in specs:
        assert spec.config.train_size == spec.train_size
        assert spec.config.data_seed == DEFAULT_DATA_SEED  # one split for every seed
        assert spec.config.seed == spec.seed
        assert spec.config.max_steps == {20: 5, 60: 6}[spec.train_size]  # ceil(2 x 20 / 8) = 5; 15 -> 6
    with pytest.raises(ConfigError, match="repeats"):
        plan_runs(_base(assets), ["lora"], [0], tmp_path, {}, train_sizes=[20, 20])
    with pytest.raises(ConfigError, match="positive"):
        plan_runs(_base(assets), ["lora"], [0], tmp_path, {}, train_sizes=[0])


def _prepared(assets, tmp_path, method, seed, size, data_seed=DEFAULT_DATA_SEED):
    values = dict(method=method, seed=seed, train_size=size, data_seed=data_seed)
    config = TrainConfig.from_sources(None, {**_settings(assets), **values})
    config.output_dir = str(tmp_path / f"{method}-{seed}-{size}-{data_seed}")
    return TrainingRun.prepare(config, log=lambda _: None).splits


def test_subsets_are_nested_and_the_same_for_every_method_and_seed(assets, tmp_path):
    small = _prepared(assets, tmp_path, "lora", 0, 20)
    large = _prepared(assets, tmp_path, "lora", 0, 60)
    assert len(small.train) == 20 and len(large.train) == 60
    assert large.train[:20] == small.train  # nested: the smaller set is a prefix of the larger
    assert small.test == large.test and small.validation == large.validation  # evaluation never moves
    for method, seed in (("full", 0), ("lora", 1), ("ia3", 2)):
        other = _prepared(assets, tmp_path, method, seed, 20)
        assert other.train == small.train and other.test == small.test
    # the data seed, not the training seed, chooses the subset
    assert _prepared(assets, tmp_path, "lora", 0, 20, data_seed=5).train != small.train
    with pytest.raises(DataError, match="train_size"):
        _prepared(assets, tmp_path, "lora", 0, 10_000)


@pytest.fixture(scope="module")
def comparison(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("lab-lowdata-run") / "compare"
    result = run_comparison(
        _base(assets),
        ["lora", "bitfit"],
        [0, 1],
        out,
        show_progress=False,
        latency_repeats=1,
        latency_batch=2,
        train_sizes=[20, 60],
        min_steps=2,
        test_limit=24,
    )
    return out, result


@pytest.mark.slow
def test_each_run_trains_its_size_for_its_budget(comparison):
    out, result = comparison
    for run in result.runs:
        assert run.ok, run.error
        assert run.steps == {20: 5, 60: 6}[run.train_size]
        log = (out / "runs" / f"{run.method}-n{run.train_size}-seed{run.seed}" / "worker.log").read_text()
        assert f"train {run.train_size}," in log  # the worker trained on exactly that many examples


@pytest.mark.slow
def test_table_and_chart_hold_mean_and_spread_per_method_and_size(comparison):
    out, result = comparison
    document = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["train_size"]): r for r in document["methods"]}
    assert set(rows) == {(m, n) for m in ("lora", "bitfit") for n in (20, 60)}
    for (method, size), row in rows.items():
        values = [r.metric_value for r in result.runs if (r.method, r.train_size) == (method, size)]
        assert len(values) == 2
        assert row["metric_mean"] == pytest.approx(statistics.fmean(values))
        assert row["metric_std"] == pytest.approx(statistics.stdev(values))
        assert row["steps"] == {20: 5, 60: 6}[size]
    markdown = (out / "results.md").read_text()
    assert "| method | 20 examples | 60 examples |" in markdown
    lora = next(line for line in markdown.splitlines() if line.startswith("| lora | "))  # the size table
    cells = [c.strip() for c in lora.split("|")[2:4]]
    for size, cell in zip((20, 60), cells, strict=True):
        row = rows[("lora", size)]
        assert cell == f"{row['metric_mean']:.4f} ± {row['metric_std']:.4f}"
    assert "the first 24 of the test split" in markdown
    chart = out / "metric_vs_train_size.png"
    assert chart.read_bytes()[:8] == PNG_MAGIC and chart.stat().st_size > 5_000
    assert not math.isnan(rows[("bitfit", 60)]["metric_mean"])


def test_cli_refuses_train_size_with_train_sizes(assets, tmp_path, capsys):
    from peftkit.cli.main import main

    args = ["compare", "--model", str(assets["bert"]), "--train-size", "20", "--output-dir", str(tmp_path)]
    assert main(args) == 2
    assert "use --train-sizes" in capsys.readouterr().err


@pytest.mark.slow
def test_report_tabulates_the_finished_runs_and_marks_the_rest_not_run(assets, comparison):
    out, result = comparison
    report = run_comparison(
        _base(assets),
        ["lora", "bitfit"],
        [0, 1, 2],  # seed 2 never ran
        out,
        show_progress=False,
        train_sizes=[20, 60],
        min_steps=2,
        test_limit=24,
        report_only=True,
    )
    finished = {(r.method, r.train_size, r.seed): r.metric_value for r in result.runs}
    for run in report.runs:
        if run.seed == 2:
            assert not run.ok and "not run" in run.error
        else:
            assert run.ok and run.metric_value == finished[(run.method, run.train_size, run.seed)]
    assert all(r.status == "partial" for r in report.rows)
    assert "(2 seeds)" in (out / "results.md").read_text()
