"""`peftkit train --fsdp`: two FSDP2 processes (torchrun, gloo, CPU) end with the adapter, the logged losses
and the checkpoint of one process at the same global batch; a checkpoint resumes across the two; methods
that cannot be sharded are refused by name; `accelerate launch` really starts two processes."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from peftkit import LoraConfig, get_peft_model
from peftkit.cli.main import main
from peftkit.config import ConfigError
from peftkit.training import fsdp
from peftkit.training.config import TrainConfig
from peftkit.training.run import TrainingRun
from tests import pipeline_fixtures as fx
from tests.tiny_models import TINY_MODELS

BIN = os.path.dirname(sys.executable)
TIMEOUT = 300  # seconds a launch may take (each process imports torch and transformers: slow on a busy CPU)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-assets")
    return {
        "llama": fx.tiny_llama(root / "llama"),
        "qa": fx.qa_jsonl(root / "qa.jsonl", rows=64),
        "bert": fx.tiny_bert(root / "bert"),
        "reviews": fx.sentiment_csv(root / "reviews.csv", rows=64),
    }


def _settings(assets, case: str, steps: int = 4) -> list[str]:
    """The flags of one small run (both runs of a comparison take them), without batch size and folder."""
    common = ["--limit", "none", "--max-steps", str(steps), "--eval-every", "2", "--save-every", "2"]
    common += ["--max-length", "16", "--eval-limit", "8", "--eval-batch-size", "8", "--learning-rate", "0.01"]
    common += ["--dropout", "0"] if case in ("lora", "lora-checkpointing", "qlora", "classifier") else []
    if case == "classifier":  # the fresh task head trains in full beside LoRA
        data = ["--model", str(assets["bert"]), "--dataset", str(assets["reviews"])]
        data += fx.SENTIMENT_FLAGS
        return [*data, *common, "--method", "lora"]
    data = ["--model", str(assets["llama"]), "--dataset", str(assets["qa"]), "--task", "causal-lm"]
    prompts = ["--num-virtual-tokens", "4"] if case in ("prefix_tuning", "prompt_tuning", "p_tuning") else []
    method = ["--method", case, *prompts]
    if case == "lora-checkpointing":  # activations recomputed in the backward pass, inside sharded blocks
        method = ["--method", "lora", "--gradient-checkpointing"]
    return [*data, *common, *method]


def _one_process(args: list[str]) -> None:
    assert main(["train", *args]) == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(launcher: list[str], args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [*launcher, "-m", "peftkit.cli.main", "train", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    return _launch([f"{BIN}/torchrun", "--standalone", "--nproc_per_node", "2"], args)


def _train_losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e["loss"] for e in map(json.loads, lines) if e["kind"] == "train"]


def _assert_same_adapter(run_dir, reference_dir, folder="adapter"):
    mine, reference = run_dir / folder, reference_dir / folder
    assert json.loads((mine / "adapter_config.json").read_text()) == json.loads(
        (reference / "adapter_config.json").read_text()
    )
    ours, theirs = (
        load_file(mine / "adapter_model.safetensors"),
        load_file(reference / "adapter_model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    # each process pads its part of a step's batch to its own longest row (length-grouped batches make the
    # parts' lengths differ more): the sums round differently, and Adam, dividing by each entry's own gradient
    # size, moves an entry whose gradient is near zero by a few 1e-6 for it (as in test_training_pipeline)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=5e-6, msg=key)


def _assert_same_trainer_state(run_dir, reference_dir):
    """The optimizer state of the checkpoint: the one-process layout (parameter indices, whole tensors)."""
    ours, theirs = (
        torch.load(d / "checkpoint" / "trainer_state.pt", weights_only=True) for d in (run_dir, reference_dir)
    )
    assert ours["progress"] == theirs["progress"]
    assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    assert ours["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
    for index, entry in theirs["optimizer"]["state"].items():
        for name, value in entry.items():
            torch.testing.assert_close(ours["optimizer"]["state"][index][name], value, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "lora",
        "lora-checkpointing",
        "qlora",
        "classifier",
        "prefix_tuning",
        "prompt_tuning",
        "p_tuning",
        "ia3",
        "bottleneck",
    ],
)
def test_two_fsdp_processes_match_one_process_at_the_same_global_batch(assets, tmp_path, case):
    """Global batch 8 both ways: 1 process x batch 4 x 2 accumulation steps, and 2 FSDP processes x batch 2
    x 2 accumulation steps (gradients kept unreduced over the first micro-batch)."""
    settings = [*_settings(assets, case), "--gradient-accumulation", "2"]
    _one_process([*settings, "--batch-size", "4", "--output-dir", str(tmp_path / "one")])
    two = _torchrun([*settings, "--batch-size", "2", "--fsdp", "--output-dir", str(tmp_path / "two")])

    assert "processes: 2; global batch 8 = batch size 2 x 2 processes x 2 accumulation steps" in two.stdout
    blocks = 3 if case == "classifier" else 2  # BERT's embeddings are a block of their own
    assert f"fsdp: the model sharded across 2 processes, {blocks} blocks apart" in two.stdout
    assert two.stdout.count("trainable parameters") == 1, "only the main process reports"
    _assert_same_adapter(tmp_path / "two", tmp_path / "one")
    _assert_same_adapter(tmp_path / "two", tmp_path / "one", folder="checkpoint/adapter")
    _assert_same_trainer_state(tmp_path / "two", tmp_path / "one")
    torch.testing.assert_close(
        _train_losses(tmp_path / "two"), _train_losses(tmp_path / "one"), rtol=1e-5, atol=0
    )
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    recorded = json.loads((tmp_path / "two" / "result.json").read_text())
    assert (recorded["world_size"], recorded["global_batch"]) == (2, 8)
    one_recorded = json.loads((tmp_path / "one" / "result.json").read_text())
    numbers = {k: v for k, v in one_recorded["test_metrics"].items() if isinstance(v, float)}
    assert numbers and {k: recorded["test_metrics"][k] for k in numbers} == pytest.approx(numbers, rel=1e-4)
    assert recorded["trainable"] == one_recorded["trainable"]


@pytest.mark.slow
def test_a_ddp_run_resumed_under_fsdp_ends_where_one_process_ends(assets, tmp_path):
    """Trained 2 steps by two DDP processes, then resumed for 2 more (the schedule recomputed for 4) by two
    FSDP processes, which cut the checkpoint's whole optimizer state into shards and write whole ones: the
    end is one process's, trained and resumed the same way."""
    for steps, resume in ((2, []), (4, ["--resume"])):
        common = [*_settings(assets, "lora", steps), *resume]
        _one_process([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")])
        sharded = ["--fsdp"] if resume else []
        two = _torchrun([*common, *sharded, "--batch-size", "2", "--output-dir", str(tmp_path / "two")])
    assert "at step 2; fsdp: False -> True" in two.stdout
    _assert_same_adapter(tmp_path / "two", tmp_path / "one")
    _assert_same_trainer_state(tmp_path / "two", tmp_path / "one")
    torch.testing.assert_close(
        _train_losses(tmp_path / "two"), _train_losses(tmp_path / "one"), rtol=1e-5, atol=0
    )


@pytest.mark.slow
def test_a_diverging_fsdp_run_stops_on_every_process_together(assets, tmp_path):
    """The step loss is averaged over the processes before it is checked, so all stop at the same step with
    the same message (a process stopping alone would leave the others waiting in a collective)."""
    settings = [*_settings(assets, "lora"), "--learning-rate", "1e30", "--weight-decay", "0"]
    settings += ["--warmup-ratio", "0", "--batch-size", "2", "--fsdp", "--output-dir", str(tmp_path / "run")]
    launcher = [f"{BIN}/torchrun", "--standalone", "--nproc_per_node", "2", "-m", "peftkit.cli.main"]
    done = subprocess.run(
        [*launcher, "train", *settings],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=TIMEOUT,
    )
    assert done.returncode != 0
    assert (
        done.stderr.count("peftkit train: error: training diverged at step 2: the training loss is nan") == 2
    )
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.slow
def test_accelerate_launch_starts_two_cpu_processes(assets, tmp_path):
    """The flags the README gives: `--multi_gpu` picks accelerate's torch.distributed launcher, which needs no
    GPU (`--cpu` alone picks its one-process launcher)."""
    launcher = [f"{BIN}/accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launcher += [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]
    settings = _settings(assets, "lora")
    done = _launch(launcher, [*settings, "--batch-size", "2", "--output-dir", str(tmp_path / "run")])
    assert "processes: 2; global batch 4 = batch size 2 x 2 processes x 1 accumulation steps" in done.stdout
    assert json.loads((tmp_path / "run" / "result.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("method", ["bitfit", "layer_tuning", "full"])
def test_fsdp_refuses_methods_that_train_base_parameters_in_place(assets, tmp_path, method):
    config = TrainConfig.from_sources(
        None,
        dict(
            model=str(assets["bert"]),
            dataset=str(assets["reviews"]),
            task="sequence-classification",
            columns={"text": "review", "label": "sentiment"},
            method=method,
            fsdp=True,
            max_steps=1,
            output_dir=str(tmp_path / "run"),
        ),
    )
    with pytest.raises(ConfigError, match=rf"--fsdp cannot shard adapter 'default' \({method}\): it trains"):
        TrainingRun.prepare(config, log=lambda *_: None)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_lora_training_biases_cannot_be_sharded(bias):
    model = get_peft_model(TINY_MODELS["gpt2"].build(), LoraConfig(r=2, bias=bias))
    with pytest.raises(ConfigError, match=r"\(lora\): it trains \d+ of the base model's own parameters"):
        fsdp.check_shardable(model)
    fsdp.check_shardable(get_peft_model(TINY_MODELS["gpt2"].build(), LoraConfig(r=2)))  # bias none: fine


@pytest.mark.parametrize(
    ("family", "blocks"),
    [("llama", {"LlamaDecoderLayer"}), ("t5", {"T5Block"}), ("bert", {"BertEmbeddings", "BertLayer"})],
)
def test_blocks_are_the_classes_transformers_keeps_whole_or_a_module_list_stacks(family, blocks):
    model = get_peft_model(TINY_MODELS[family].build(), LoraConfig(r=2))
    assert fsdp.block_classes(model) == blocks


def test_without_declared_blocks_the_stacked_layers_are_the_blocks(monkeypatch):
    model = get_peft_model(TINY_MODELS["bert"].build(), LoraConfig(r=2))
    for module in model.modules():
        monkeypatch.setattr(module, "_no_split_modules", None, raising=False)
    assert fsdp.block_classes(model) == {"BertLayer"}  # encoder.layer, a ModuleList of BertLayer
