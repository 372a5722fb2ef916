"""`peftkit compare` on a tiny model: one table row per method, consistent numbers, charts, failures reported."""

import csv
import json
import math
import statistics

import pytest
import torch

from peftkit.cli.compare import parse_method_settings
from peftkit.cli.main import main
from peftkit.config import ConfigError
from peftkit.lab import run_comparison
from peftkit.lab.latency import measure_latency
from peftkit.lab.records import RunRecord, median_after_warmup
from peftkit.lab.summary import COLUMNS, summarize
from peftkit.lab.tables import markdown
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.lora import LoraConfig
from peftkit.model import get_peft_model
from peftkit.training.config import TrainConfig
from peftkit.training.layout import RunFolder
from tests import pipeline_fixtures as fx

METHODS = ["lora", "full", "ia3", "no_such_method"]
SEEDS = [0]  # one process per run: the spread over seeds is checked on records below
STEPS = 6
CHARTS = ["metric_vs_params.png", "peak_memory.png", "step_time.png", "latency.png", "loss_curves.png"]


def adapter_file_parameters(path) -> int:
    """Values stored in a safetensors file, read from its header (an independent count of the adapter)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab-assets")
    return {"bert": fx.tiny_bert(root / "bert"), "sentiment": fx.sentiment_csv(root / "reviews.csv")}


def _base(assets, **overrides):
    settings = dict(
        model=str(assets["bert"]),
        dataset=str(assets["sentiment"]),
        task="sequence-classification",
        columns={"text": "review", "label": "sentiment"},
        limit=None,
        max_steps=STEPS,
        batch_size=8,
        learning_rate=1e-2,
        eval_every=STEPS,
        save_every=STEPS,
        eval_limit=32,
        max_length=16,
        dropout=0.0,
    )
    settings.update(overrides)
    return TrainConfig.from_sources(None, settings)


@pytest.fixture(scope="module")
def comparison(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("lab") / "compare"
    result = run_comparison(
        _base(assets),
        METHODS,
        SEEDS,
        out,
        # a setting that fails inside the worker: IA3 on modules the model does not have
        {"ia3": {"target_modules": ["no_such_module"]}},
        show_progress=False,
        latency_repeats=3,
    )
    return out, result


def _rows(comparison):
    out, _ = comparison
    return {r["method"]: r for r in json.loads((out / "results.json").read_text())["methods"]}


def test_tables_have_the_columns_and_one_row_per_method(comparison):
    out, result = comparison
    with (out / "results.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == COLUMNS
        assert [row["method"] for row in reader] == METHODS
    document = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in document["methods"]] == METHODS
    assert set(document["methods"][0]) == set(COLUMNS)
    assert [(r["method"], r["seed"]) for r in document["runs"]] == [(m, s) for m in METHODS for s in SEEDS]
    markdown = (out / "results.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(METHODS)  # header and one row per method
    assert [line.split("|")[1].strip() for line in table[1:]] == METHODS
    assert {str(f.name) for f in result.files} >= {"results.md", "results.csv", "results.json"}


def test_numbers_are_consistent_with_the_runs(comparison):
    out, result = comparison
    rows = _rows(comparison)
    lora, full = rows["lora"], rows["full"]
    for method in ("lora", "full"):
        row = rows[method]
        assert row["status"] == "ok" and row["seeds"] == "0" and row["error"] is None
        adapter = out / "runs" / f"{method}-seed0" / "adapter" / "adapter_model.safetensors"
        assert row["trainable"] == row["adapter_params"] == adapter_file_parameters(adapter)
        assert row["adapter_bytes"] == adapter.stat().st_size
        runs = [r for r in result.runs if r.method == method]
        assert row["trainable_percent"] == pytest.approx(100 * row["trainable"] / runs[0].base_params)
        values = [r.metric_value for r in runs]
        assert row["metric"] == "accuracy"
        assert row["metric_mean"] == pytest.approx(statistics.fmean(values))
        assert row["metric_std"] is None  # one seed: no spread
        for run in runs:
            assert run.steps == STEPS and [s for s, _ in run.loss_curve] == list(range(1, STEPS + 1))
            assert run.step_ms > 0 and run.train_seconds < run.run_seconds
            assert run.peak_memory_bytes > 0
        for key in (
            "peak_memory_bytes",
            "predicted_peak_bytes",  # peftkit plan's, next to the measured one
            "base_weight_bytes",
            "step_ms",
            "latency_base_ms",
            "latency_unmerged_ms",
        ):
            assert row[key] > 0, key
        assert row["latency_merged_ms"] is not None  # both merge (full: the values live in the weights)
    assert lora["trainable"] < full["trainable"]
    assert lora["base_weight_bytes"] == full["base_weight_bytes"]  # the same fp32 base, adapters left out
    assert full["trainable_percent"] == pytest.approx(100.0)
    assert lora["learning_rate"] == full["learning_rate"] == 1e-2  # the base config's, no defaults here


def test_base_weight_bytes_leave_the_adapters_out_and_count_4bit_storage():
    from peftkit import get_qlora_model, quantize_model
    from peftkit.accounting import base_weight_bytes
    from peftkit.quantization import storage_report
    from tests.tiny_models import TINY_MODELS

    tiny = TINY_MODELS["llama"]
    plain = tiny.build()
    expected = storage_report(plain).total_bytes  # every tensor of the plain model, tied ones once
    lora = get_peft_model(tiny.build(), LoraConfig(r=4, target_modules="all-linear"))
    assert base_weight_bytes(lora) == expected
    quantized = tiny.build()
    quantize_model(quantized)
    qlora = get_qlora_model(tiny.build(), LoraConfig(r=4, target_modules="all-linear"))
    assert base_weight_bytes(qlora) == storage_report(quantized).total_bytes
    assert base_weight_bytes(qlora) < 0.8 * expected


def test_failed_methods_are_reported_not_raised(comparison):
    out, _ = comparison
    rows = _rows(comparison)
    assert rows["ia3"]["status"] == "failed" and "no_such_module" in rows["ia3"]["error"]
    assert rows["no_such_method"]["status"] == "failed"
    assert "unknown method 'no_such_method'" in rows["no_such_method"]["error"]
    assert rows["ia3"]["metric_mean"] is None and rows["ia3"]["trainable"] is None
    markdown = (out / "results.md").read_text()
    assert "| ia3 |" in markdown and "failed: seed 0: " in markdown and "no_such_module" in markdown
    assert (out / "runs" / "ia3-seed0" / "worker.log").read_text().strip()  # the traceback, for debugging


def test_charts_are_written(comparison):
    out, result = comparison
    for name in CHARTS:
        path = out / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert path in result.files


def test_an_earlier_comparison_is_not_overwritten_by_accident(comparison, assets):
    out, _ = comparison
    with pytest.raises(ConfigError, match="--overwrite"):
        run_comparison(_base(assets), ["lora"], [0], out, show_progress=False)


def test_latency_of_a_method_that_cannot_merge_is_not_available(assets):
    from transformers import AutoModelForSequenceClassification

    batch = fx.tokenizer()(["a good film", "a bad plot"], return_tensors="pt", padding=True)
    for config, merges in [
        (BottleneckConfig(placement="houlsby", bottleneck_size=4), False),
        (LoraConfig(r=2, target_modules="all-linear"), True),
    ]:
        base = AutoModelForSequenceClassification.from_pretrained(assets["bert"])
        model = get_peft_model(base, config)
        before = model(**batch).logits
        latency = measure_latency(model, dict(batch), repeats=2, warmup=1)
        assert latency.base_ms > 0 and latency.unmerged_ms > 0
        assert (latency.merged_ms is not None) == merges
        assert (latency.merge_note is None) == merges
        assert torch.allclose(model(**batch).logits, before, atol=1e-5)  # left unmerged, as it was


def test_summary_over_seeds_and_step_time():
    def record(seed, value, status="ok"):
        if status != "ok":
            return RunRecord("m", seed, status, error="boom")
        return RunRecord("m", seed, "ok", metric="accuracy", metric_value=value, trainable=10, step_ms=2.0)

    (row,) = summarize([record(0, 0.5), record(1, 0.7), record(2, None, "failed")])
    assert row.status == "partial" and row.seeds == "0,1" and row.error == "seed 2: boom"
    assert row.metric_mean == pytest.approx(0.6) and row.metric_std == pytest.approx(0.1414, abs=1e-4)
    assert "| m | 0.6000 ± 0.1414 |" in markdown([row], {"model": "tiny", "dataset": "csv"})
    (single,) = summarize([record(0, 0.5)])
    assert single.metric_std is None and single.status == "ok"
    assert median_after_warmup([9.0] * 5 + [1.0, 2.0, 3.0]) == 2.0
    assert median_after_warmup([4.0]) == 4.0


def test_method_settings_and_per_run_flags_on_the_command_line(capsys):
    assert parse_method_settings(["full.learning_rate=3e-5", "lora.r=16"], ["full", "lora"]) == {
        "full": {"learning_rate": 3e-5},
        "lora": {"r": 16},
    }
    with pytest.raises(ConfigError, match=r"METHOD\.SETTING=VALUE"):
        parse_method_settings(["learning_rate=3e-5"], ["full"])
    with pytest.raises(ConfigError, match="not one of --methods"):
        parse_method_settings(["ia3.r=4"], ["full"])
    with pytest.raises(ConfigError, match="unknown setting 'rank'"):
        parse_method_settings(["lora.rank=4"], ["lora"])
    assert parse_method_settings(["lora.bf16=true", "lora.max-steps=none"], ["lora"]) == {
        "lora": {"bf16": True, "max_steps": None}
    }
    assert main(["compare", "--seed", "1"]) == 2
    assert "use --seeds" in capsys.readouterr().err


def test_resume_reuses_finished_runs_and_reruns_changed_ones(assets, tmp_path):
    out, base = tmp_path / "compare", _base(assets)
    options = {"show_progress": False, "latency_repeats": 1}
    first = run_comparison(base, ["lora", "bitfit"], [0], out, **options)
    for method in ("lora", "bitfit"):
        (out / "runs" / f"{method}-seed0" / "kept").write_text("")
    with pytest.raises(ConfigError, match="--resume to reuse"):
        run_comparison(base, ["lora"], [0], out, **options)
    with pytest.raises(ConfigError, match="exclude each other"):
        run_comparison(base, ["lora"], [0], out, overwrite=True, resume=True, **options)
    changed = {"bitfit": {"learning_rate": 5e-3}}
    second = run_comparison(base, ["lora", "bitfit"], [0], out, changed, resume=True, **options)
    assert (out / "runs" / "lora-seed0" / "kept").exists()  # same settings: reused
    assert not (out / "runs" / "bitfit-seed0" / "kept").exists()  # other settings: run again
    before, after = ({r.method: r for r in c.runs} for c in (first, second))
    assert after["lora"] == before["lora"]  # the whole record, load average and loss curve included
    assert after["bitfit"].learning_rate == 5e-3 != before["bitfit"].learning_rate


def test_resume_and_report_reuse_runs_whose_max_length_was_chosen_from_the_data(assets, tmp_path):
    out, base = tmp_path / "compare", _base(assets, max_length=None)
    options = {"show_progress": False, "latency_repeats": 1}
    first = run_comparison(base, ["bitfit"], [0], out, **options)
    assert RunFolder(out / "runs" / "bitfit-seed0").read_config().max_length is not None  # the chosen length
    (out / "runs" / "bitfit-seed0" / "kept").write_text("")
    reported = run_comparison(base, ["bitfit"], [0], out, report_only=True, **options)
    resumed = run_comparison(base, ["bitfit"], [0], out, resume=True, **options)
    assert (out / "runs" / "bitfit-seed0" / "kept").exists()  # reused, not run again
    assert reported.runs == resumed.runs == first.runs


def test_method_defaults_follow_a_built_in_dataset_and_yield_to_the_user():
    from peftkit.lab import default_method_settings
    from peftkit.lab.defaults import DATASET_METHOD_DEFAULTS, METHOD_DEFAULTS

    plain = default_method_settings(["full", "ia3"])
    assert plain == {"full": METHOD_DEFAULTS["full"], "ia3": METHOD_DEFAULTS["ia3"]}
    ner = default_method_settings(["full", "ia3"], dataset="wnut16")
    assert ner["full"] == DATASET_METHOD_DEFAULTS["wnut16"]["full"] != plain["full"]
    assert ner["ia3"] == plain["ia3"]  # no value for this dataset: the method's own
    assert default_method_settings(["full"], keep={"learning_rate"}, dataset="wnut16") == {"full": {}}


def test_progress_counts_steps_of_every_run_and_leaves_reused_runs_out(assets, tmp_path):
    from peftkit.lab.plan import plan_runs
    from peftkit.lab.progress import ComparisonProgress

    specs = plan_runs(_base(assets), ["lora", "full"], [0, 1], tmp_path)
    progress = ComparisonProgress(specs)  # shown (on the captured stderr): a disabled bar counts nothing
    assert progress.bar.total == 4 * STEPS
    progress.start(0, specs[0])
    progress.reused(0)  # kept from an earlier comparison: not part of what is left to do
    progress.finish(0, ok=True)
    assert (progress.bar.n, progress.bar.total) == (0, 3 * STEPS)
    progress.start(1, specs[1])
    progress.steps_done(1, 2)
    assert progress.bar.n == 2
    progress.finish(1, ok=False)
    assert (progress.bar.n, progress.failed) == (STEPS, 1)
