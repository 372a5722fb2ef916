"""Generated bad inputs through the `peftkit` command line (its main, in-process): flag values, YAML settings
files, data files and the files of a finished run.

Every input must end with exit status 2 and a last stderr line ``peftkit CMD: error: ...`` that names the
flag, the key or the file; nothing may be written outside the case's own output folder (the working
directory, the model, the data and a good run are compared before and after), and the good run still
predicts. The generator is seeded: a failure names a reproducible case (``family-index``).

Families and how they end (counts in N_CASES):
- flags: argparse's usage error naming ``--flag`` (exit 2 by SystemExit), before anything is read;
- yaml: ``peftkit train: error: FILE...`` from reading or validating the settings, before a folder is made;
- data: ``peftkit train: error: FILE[, line N]: ...`` from loading the data, before the model is loaded;
- run: ``peftkit predict|eval: error: FILE: ...`` for a damaged labels.json / config.yaml of a copied run.
"""

import contextlib
import io
import json
import math
import random
import shutil
from pathlib import Path

import pytest

from peftkit.cli.main import main
from peftkit.training.ranges import SETTING_RANGES
from tests import pipeline_fixtures as fx

N_CASES = {"flags": 160, "yaml": 120, "data": 80, "run": 40}
WORDS = ["good", "bad", "film", "plot", "the", "was", "great", "awful"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model, a data file and a finished good run, made once; every case runs beside them."""
    root = tmp_path_factory.mktemp("fuzz_cli")
    model = fx.tiny_bert(root / "model")
    data = fx.sentiment_csv(root / "reviews.csv", rows=80)
    flags = [*_base(model, data), "--output-dir", str(root / "good"), "--max-steps", "1"]
    flags += ["--eval-every", "1", "--save-every", "1", "--batch-size", "8"]
    assert _cli(flags)[0] == 0
    (root / "cases").mkdir()
    (root / "cwd").mkdir()
    return root


def _base(model, data, text="review", label="sentiment"):
    task = ["--task", "sequence-classification", "--text-column", text, "--label-column", label]
    return ["train", "--model", str(model), "--dataset", str(data), *task]


def _cli(argv, stdin=""):
    """(exit status, last stderr line) of ``peftkit argv`` run in-process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code
    lines = err.getvalue().strip().splitlines()
    return status, lines[-1] if lines else ""


def _state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file outside the cases' folders, by (size, modification time)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "cases" not in p.relative_to(root).parts
    }


# --- generators: each returns (argv, stdin, the text the error line must contain) ------------------------------


def _bad_number(rng, spec):
    """A value outside ``spec`` (a Range), as text."""
    choices = ["nan", "inf", "-inf", "abc", "", "1e", "0x10", "[1]"]
    if spec.low != -math.inf:
        choices += [f"{spec.low - rng.choice([1, 0.5, 1e-3, 1e6]):g}"]
        if spec.low_open:
            choices.append(f"{spec.low:g}")
    if spec.high != math.inf:
        choices += [f"{spec.high + rng.choice([0, 1, 1e6]):g}" if spec.high_open else f"{spec.high + 1:g}"]
    if spec.kind is int:
        choices += [f"{rng.randint(1, 9)}.{rng.randint(1, 9)}", "1e3"]
    if spec.kind is bool:  # switches are --flag / --no-flag: a value is refused
        choices = ["true", "1", "yes"]
    return rng.choice(choices)


def _flag_case(rng, world, i):
    name = rng.choice(sorted(SETTING_RANGES))
    flag = "--" + name.replace("_", "-")
    value = _bad_number(rng, SETTING_RANGES[name])
    if SETTING_RANGES[name].kind is bool:
        argv = ["train", f"{flag}={value}"]
        return argv, "", "peftkit train: error: argument"
    return (
        ["train", f"{flag}={value}", "--output-dir", str(world / "cases" / f"f{i}")],
        "",
        f"argument {flag}",
    )


def _yaml_value(rng, spec):
    if spec.kind is bool:
        return rng.choice(["2", "'maybe'", "[true]", "{a: 1}", "0.5"])
    choices = [".nan", ".inf", "-.inf", "'abc'", "[1, 2]", "{a: 1}", "true"]
    if spec.low != -math.inf:
        choices.append(f"{spec.low - rng.choice([1, 2.5, 1e9]):g}")
        if spec.low_open:
            choices.append(f"{spec.low:g}")
    if spec.kind is int:
        choices += [f"{rng.randint(1, 99)}.5", "'7.5'"]
    if spec.high != math.inf:
        choices.append(f"{spec.high + 1:g}" if not spec.high_open else f"{spec.high:g}")
    return rng.choice(choices)


def _yaml_text(rng):
    kind = rng.randrange(8)
    if kind <= 2:  # a ranged setting out of its range or of the wrong type
        name = rng.choice(sorted(SETTING_RANGES))
        return f"{name}: {_yaml_value(rng, SETTING_RANGES[name])}\n", f"`{name}`"
    if kind == 3:  # YAML that does not parse
        return rng.choice(
            [
                "epochs: [1\n",
                "a: b: c\n",
                "epochs: 1\n  max_steps: 2\n",
                "\tepochs: 1\n",
                "x: 'open\n",
                "{a\n",
            ]
        ), "not valid YAML"
    if kind == 4:  # not a mapping
        return rng.choice(["- epochs\n", "3\n", "'text'\n", "[1, 2]\n"]), "expected a mapping of settings"
    if kind == 5:  # unknown key
        key = "".join(rng.choice("abcdefxyz_") for _ in range(rng.randint(3, 10)))
        return f"{key}z: 1\n", "unknown training setting"
    if kind == 6:  # columns of the wrong shape
        return rng.choice(
            [
                "columns: review\n",
                "columns: [text]\n",
                "columns: {txt: a}\n",
                "columns: {text: 3}\n",
                "columns: 5\n",
            ]
        ), "`columns"
    option, value = rng.choice([("r", "-1"), ("r", "0"), ("r", "2.5"), ("dropout", "1.5"), ("alpha", ".nan")])
    method = rng.choice(["lora", "ia3"])
    return f"method: {method}\n{option}: {value}\n", f"`{option}`"


def _yaml_case(rng, world, i):
    path = world / "cases" / f"y{i}.yaml"
    text, expected = _yaml_text(rng)
    path.write_text(text)
    argv = ["train", "--config", str(path), "--output-dir", str(world / "cases" / f"y{i}")]
    return argv, "", expected


def _rows(rng, n, labels=("pos", "neg")):
    return [(" ".join(rng.sample(WORDS, 3)), rng.choice(labels)) for _ in range(n)]


def _data_file(rng, folder: Path, i):
    kind = rng.randrange(10)
    rows = _rows(rng, rng.randint(12, 30))
    csv = "".join(f"{t},{label}\n" for t, label in rows)
    path = folder / f"d{i}.csv"
    if kind == 0:
        path.write_text("text,label,text\n" + "".join(f"{t},{label},x\n" for t, label in rows))
    elif kind == 1:
        path.write_text("text,label\n" + "".join(f"{t},pos\n" for t, _ in rows))
    elif kind == 2:
        path.write_text("words,label\n" + csv)
    elif kind == 3:
        path.write_text(rng.choice(["", "text,label\n", "\n\n"]))
    elif kind == 4:
        path.write_bytes(b"text,label\n" + bytes(rng.randrange(128, 256) for _ in range(40)))
    elif kind == 5:
        lines = csv.splitlines()
        lines.insert(rng.randrange(len(lines)), "only-one-field")
        path.write_text("text,label\n" + "\n".join(lines) + "\n")
    elif kind == 6:
        lines = csv.splitlines()
        lines[rng.randrange(len(lines))] = ",pos"
        path.write_text("text,label\n" + "\n".join(lines) + "\n")
    elif kind == 7:
        path = folder / f"d{i}.jsonl"
        lines = [json.dumps({"text": t, "label": label}) for t, label in rows]
        lines[rng.randrange(len(lines))] = rng.choice(
            ["{bad", "[1, 2]", '"text"', '{"text": 5, "label": "pos"}']
        )
        path.write_text("\n".join(lines) + "\n")
    elif kind == 8:
        path = folder / f"d{i}.{rng.choice(['txt', 'parquet', 'xlsx'])}"
        path.write_text(csv)
    else:
        path = folder / f"d{i}"
        path.mkdir()
    return path


def _data_case(rng, world, i):
    path = _data_file(rng, world / "cases", i)
    argv = [
        *_base(world / "model", path, "text", "label"),
        "--output-dir",
        str(world / "cases" / f"d{i}-out"),
    ]
    if rng.random() < 0.3:  # a token-classification file whose tags are not BIO
        path = world / "cases" / f"n{i}.jsonl"
        tags = rng.choice([["PER", "O"], ["B_PER", "O"], ["O", "O"], ["B-", "O"], ["LOC", "LOC"]])
        path.write_text("".join(json.dumps({"tokens": ["a", "b"], "tags": tags}) + "\n" for _ in range(12)))
        argv = [
            "train",
            "--model",
            str(world / "model"),
            "--dataset",
            str(path),
            "--task",
            "token-classification",
        ]
        argv += ["--output-dir", str(world / "cases" / f"n{i}-out")]
    return argv, "", str(path)


def _run_case(rng, world, i):
    copy = world / "cases" / f"r{i}"
    shutil.copytree(world / "good", copy, ignore=shutil.ignore_patterns("checkpoint*", "*.lock"))
    if rng.random() < 0.6:
        damaged = copy / "labels.json"
        damaged.write_text(
            rng.choice(
                [
                    "{bad",
                    "[]",
                    "",
                    '{"task": "regression", "label_names": ["a", "b"]}',
                    '{"task": "sequence-classification", "label_names": ["a"]}',
                    '{"task": "sequence-classification", "label_names": ["a", "b", "c"]}',
                    '{"task": "sequence-classification"}',
                    '{"task": "causal-lm", "label_names": ["a", "b"]}',
                ]
            )
        )
        expected = str(copy)
    else:
        damaged = copy / "config.yaml"
        text = damaged.read_text()
        damaged.write_text(
            rng.choice(
                [text + "epochs: [1\n", text.replace("epochs: 1.0", "epochs: -1"), "- a\n", text + "zz: 1\n"]
            )
        )
        expected = str(damaged)
    command = rng.choice(["predict", "eval"])
    argv = [command, str(copy)] + (["a good film"] if command == "predict" else [])
    return argv, "", expected


GENERATORS = {"flags": _flag_case, "yaml": _yaml_case, "data": _data_case, "run": _run_case}


@pytest.mark.parametrize("family", list(N_CASES))
def test_every_bad_cli_input_ends_in_a_named_usage_error(family, world, monkeypatch):
    monkeypatch.chdir(world / "cwd")
    rng = random.Random(f"cli-{family}")
    before = _state(world)
    failures = []
    for i in range(N_CASES[family]):
        argv, stdin, expected = GENERATORS[family](rng, world, i)
        command = argv[0] if argv[0] != "eval" else "eval"
        status, line = _cli(argv, stdin)
        ok = status == 2 and line.startswith(f"peftkit {command}: error:") and expected in line
        if not ok:
            failures.append(f"{family}-{i}: {argv[1:4]} -> {status}: {line[:300]}")
    assert not failures, "\n".join(failures[:10])
    assert _state(world) == before  # nothing outside the cases' folders (model, data, good run, cwd) changed
    assert list((world / "cwd").iterdir()) == []
    status, _ = _cli(["predict", str(world / "good"), "a good film"])
    assert status == 0  # the good run still loads and predicts
