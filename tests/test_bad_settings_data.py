"""Settings that only the data, the tokenizer or the model can judge, and the files of a finished run: each
bad case is an error naming the file, column, row or setting and what is allowed, never a traceback from
torch or transformers, a silent regression head, all-[UNK] input or a division by zero; the good neighbour
of each case still works."""

import json
import shutil

import pytest

from peftkit import ConfigError, LoraConfig, PromptTuningConfig, get_peft_model
from peftkit.cli.main import main
from peftkit.data import DataError, load_splits
from peftkit.data.labels_file import read_labels_file
from peftkit.data.model_checks import check_positions, check_tokens_known
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.size_bounds import MAX_PROMPTS
from peftkit.tasks import TASKS
from tests import pipeline_fixtures as fx
from tests.tiny_models import TINY_MODELS


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("bad_data")


@pytest.fixture(scope="module")
def bert(root):
    return fx.tiny_bert(root / "bert")  # 2 layers, 64 positions, 2 labels in its saved head


@pytest.fixture(scope="module")
def data(root):
    return fx.sentiment_csv(root / "reviews.csv", rows=120)


def _flags(bert, data, out, *more):
    return [
        "train",
        "--model",
        str(bert),
        "--dataset",
        str(data),
        *fx.SENTIMENT_FLAGS,
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        *more,
    ]


@pytest.fixture(scope="module")
def finished(root, bert, data):
    assert main(_flags(bert, data, root / "run")) == 0
    return root / "run"


def _error(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


# --- targeting -----------------------------------------------------------------------------------------------


def test_layers_to_transform_must_exist_in_the_model():
    model = TINY_MODELS["bert"].build()  # layers 0 and 1
    with pytest.raises(
        ConfigError, match=r"`layers_to_transform` lists layer\(s\) \[7\] .* layers are 0 to 1"
    ):
        get_peft_model(model, LoraConfig(target_modules=["query"], layers_to_transform=[0, 7]))
    adapted = get_peft_model(
        TINY_MODELS["bert"].build(), LoraConfig(target_modules=["query"], layers_to_transform=[1])
    )
    names = [n for n, _ in adapted.named_parameters() if "lora_A" in n]
    assert names and all(".layer.1." in n for n in names)


@pytest.mark.parametrize("config", [LoraConfig, IA3Config, BottleneckConfig])
def test_a_target_regex_that_does_not_compile_is_named(config):
    with pytest.raises(ConfigError, match=r"`target_modules`='\(\[' is not a valid regular expression"):
        config(target_modules="([")
    assert config(target_modules=r".*\.(query|value)").target_modules == r".*\.(query|value)"
    with pytest.raises(ConfigError, match=r"`exclude_modules`='\*x' is not a valid regular expression"):
        LoraConfig(exclude_modules="*x")


def test_num_prompts_is_bounded_before_anything_is_allocated():
    model = TINY_MODELS["bert"].build()
    with pytest.raises(ConfigError, match=rf"`num_prompts`=1000000 is over peftkit's cap of {MAX_PROMPTS}"):
        get_peft_model(model, PromptTuningConfig(num_virtual_tokens=2, num_prompts=10**6))
    get_peft_model(TINY_MODELS["bert"].build(), PromptTuningConfig(num_virtual_tokens=2, num_prompts=4))


# --- data files ----------------------------------------------------------------------------------------------


def test_a_single_class_label_column_is_refused(tmp_path):
    (tmp_path / "one.csv").write_text("text,label\n" + "good film,pos\n" * 20)
    with pytest.raises(DataError, match=r"one.csv: column 'label' holds one label \('pos'\) in every row"):
        load_splits(tmp_path / "one.csv", "sequence-classification")
    (tmp_path / "two.csv").write_text("text,label\n" + "good film,pos\n" * 19 + "bad film,neg\n")
    assert load_splits(tmp_path / "two.csv", "sequence-classification").label_names == ("neg", "pos")


def test_a_duplicated_csv_column_is_refused(tmp_path):
    (tmp_path / "dup.csv").write_text("text,label,text\na,pos,b\nc,neg,d\n")
    with pytest.raises(
        DataError, match=r"dup.csv, line 1: column name\(s\) \['text'\] appear more than once"
    ):
        load_splits(tmp_path / "dup.csv", "sequence-classification")
    (tmp_path / "index.csv").write_text(",text,label\n0,a,pos\n1,c,neg\n")  # pandas' unnamed index column
    assert len(load_splits(tmp_path / "index.csv", "sequence-classification")) == 2


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        (["PER", "O"], r"tag\(s\) \['PER'\] in column 'tags' are not in the BIO scheme"),
        (["B_PER", "O"], r"\['B_PER'\] .* not in the BIO scheme"),
        (["B-", "O"], r"\['B-'\] .* not in the BIO scheme"),
        ([1, 0], r"\['0', '1'\] .* not in the BIO scheme"),
        (["O", "O"], r"column 'tags' tags every word 'O': there are no entities"),
    ],
)
def test_ner_tags_must_be_in_the_bio_scheme(tags, message, tmp_path):
    rows = [{"tokens": ["Ada", "wrote"], "tags": tags}, {"tokens": ["x", "y"], "tags": ["O", "O"]}]
    (tmp_path / "ner.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=message):
        load_splits(tmp_path / "ner.jsonl", "token-classification")


def test_bio_and_iobes_tags_are_accepted(tmp_path):
    rows = [
        {"tokens": ["Ada", "Love", "wrote"], "tags": ["B-PER", "I-PER", "O"]},
        {"tokens": ["x"], "tags": ["S-LOC"]},
    ]
    (tmp_path / "ner.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_splits(tmp_path / "ner.jsonl", "token-classification").label_names == (
        "O",
        "B-PER",
        "I-PER",
        "S-LOC",
    )


# --- tokenizer, positions, splits: refused before the first step, nothing half-written ------------------------


def test_a_model_folder_without_tokenizer_files_is_refused(root, bert, data, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(bert / name, bare / name)
    assert main(_flags(bare, data, tmp_path / "out")) == 2
    assert f"peftkit train: error: {bare}: the tokenizer has no vocabulary" in _error(capsys)
    assert not (tmp_path / "out" / "adapter").exists()


def test_input_the_tokenizer_cannot_read_is_refused():
    tokenizer = fx.tokenizer()
    with pytest.raises(DataError, match=r"data.csv: every token of the first 2 training inputs is .*\[UNK\]"):
        check_tokens_known(tokenizer, ["ⰰⰱⰲ", "ⰳⰴ"], "data.csv")
    check_tokens_known(tokenizer, ["ⰰⰱⰲ", "a good film"], "data.csv")  # some known words: fine


def test_max_length_beyond_the_model_positions_is_refused(bert, data, tmp_path, capsys):
    assert main(_flags(bert, data, tmp_path / "out", "--max-length", "65")) == 2
    assert "`max_length` 65 = 65 tokens exceed the 64 positions of BertForSequenceClassification" in _error(
        capsys
    )
    flags = ["--method", "prompt_tuning", "--max-length", "48", "--num-virtual-tokens", "20"]
    assert main(_flags(bert, data, tmp_path / "out2", *flags)) == 2
    assert "`max_length` 48 + `num_virtual_tokens` 20 = 68 tokens exceed the 64 positions" in _error(capsys)
    assert not (tmp_path / "out" / "adapter").exists() and not (tmp_path / "out2" / "adapter").exists()
    assert main(_flags(bert, data, tmp_path / "ok", "--max-length", "64")) == 0


def test_a_prompt_beyond_the_positions_is_refused_not_a_torch_error():
    model = TINY_MODELS["gpt2"].build()  # 32 positions
    tokenizer = fx.tokenizer()
    with pytest.raises(ConfigError, match=r"prompt 1 \d+ \+ --max-new-tokens 8 = \d+ tokens exceed the 32"):
        TASKS["causal-lm"].predict(
            model, ["word " * 40], tokenizer, max_length=16, label_names=None, max_new_tokens=8
        )
    check_positions(model, [("`max_length`", 24), ("--max-new-tokens", 8)])  # exactly 32: fine


def test_an_empty_validation_split_is_refused(bert, data, tmp_path, capsys):
    assert main(_flags(bert, data, tmp_path / "out", "--limit", "4", "--batch-size", "2")) == 2
    assert "the validation split is empty: 4 records (--limit 4: the first 4 only)" in _error(capsys)


def test_a_saved_head_with_another_label_count_is_replaced_not_a_traceback(bert):
    model = TASKS["sequence-classification"].load_model(bert, ["a", "b", "c"], fx.tokenizer())
    assert model.classifier.out_features == 3


# --- a finished run's files -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{bad", r"labels.json is not valid JSON"),
        ("[]", r"labels.json must hold a JSON object"),
        (
            '{"task": "regression", "label_names": ["a", "b"]}',
            r"`task` must be one of sequence-classification",
        ),
        ('{"label_names": ["a", "b"]}', r"`task` must be one of .*, got None"),
        ('{"task": "sequence-classification", "label_names": ["a"]}', r"at least 2 distinct non-empty names"),
        ('{"task": "sequence-classification", "label_names": ["a", "a"]}', r"at least 2 distinct"),
        ('{"task": "sequence-classification", "label_names": "ab"}', r"`label_names` must be a list"),
        ('{"task": "causal-lm", "label_names": ["a", "b"]}', r"`label_names` must be null for causal-lm"),
    ],
)
def test_a_bad_labels_file_is_named(text, message, tmp_path):
    (tmp_path / "labels.json").write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_labels_file(tmp_path / "labels.json")


def test_a_run_whose_labels_do_not_fit_its_head_is_refused(finished, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    (copy / "labels.json").write_text('{"task": "sequence-classification", "label_names": ["a", "b", "c"]}')
    assert main(["predict", str(copy), "a good film"]) == 2
    assert "lists 3 labels but the adapter's head 'classifier' has 2 outputs" in _error(capsys)
    (copy / "labels.json").write_text("{bad")
    assert main(["eval", str(copy)]) == 2
    assert f"peftkit eval: error: {copy / 'labels.json'} is not valid JSON" in _error(capsys)


def test_predict_without_inputs_is_a_message(finished, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["predict", str(finished)]) == 2
    assert "peftkit predict: error: no inputs: give texts as arguments, or one per line on stdin" in _error(
        capsys
    )
    monkeypatch.setattr("sys.stdin", io.StringIO("a good film\n\n"))
    assert main(["predict", str(finished)]) == 0
    assert json.loads(capsys.readouterr().out)["output"] in ("neg", "pos")
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(finished), "hi", "--max-new-tokens", "0"])
    assert exit_.value.code == 2
    assert "argument --max-new-tokens: must be an integer >= 1, got '0'" in _error(capsys)


def test_a_fractional_epoch_runs_that_share_of_the_steps(bert, data, tmp_path):
    # 120 records: 96 train; batch 8 -> 12 steps an epoch; a quarter is 3 steps (not the default 400)
    flags = _flags(bert, data, tmp_path / "out", "--max-steps", "none", "--epochs", "0.25")
    assert main(flags) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["steps"] == 3
