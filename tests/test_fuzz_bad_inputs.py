"""Generated bad inputs at peftkit's library boundary: adapter names, config values and adapter files.

Every input must end in peftkit's own error (ConfigError / AdapterError / CheckpointError) whose message names
the field, file or key; nothing outside the target folder may change; a good adapter saved before survives.
The generator is seeded, so a failure names a reproducible case (``family-index``)."""

import json
import math
import random
import struct

import pytest
import torch

from peftkit import (
    AdapterError,
    CheckpointError,
    ConfigError,
    LoraConfig,
    PeftModel,
    PromptTuningConfig,
    get_peft_model,
)
from peftkit import checkpoint as ckpt
from tests.tiny_models import TINY_MODELS

MLP = TINY_MODELS["mlp"]
PEFTKIT_ERRORS = (ConfigError, AdapterError, CheckpointError)
NAME_CHARS = "abcXYZ019_-"
BAD_CHARS = "/\\. :*?\"'<>|\x00\n\té€😀"
N_NAMES, N_LORA, N_PROMPT, N_WEIGHTS, N_CONFIGS, N_TENSORS = 120, 60, 20, 80, 60, 60


def _bad_name(rng: random.Random):
    kind = rng.randrange(6)
    ok = "".join(rng.choice(NAME_CHARS) for _ in range(rng.randint(0, 12)))
    if kind == 0:  # a forbidden character somewhere
        i = rng.randint(0, len(ok))
        return ok[:i] + rng.choice(BAD_CHARS) + ok[i:]
    if kind == 1:  # too long
        return "".join(rng.choice(NAME_CHARS) for _ in range(rng.randint(65, 400)))
    if kind == 2:  # a relative path that climbs
        return "/".join([".."] * rng.randint(1, 4) + [ok or "x"])
    if kind == 3:  # an absolute path (made to point into the test's folder below)
        return "/ABS/" + (ok or "x")
    if kind == 4:
        return rng.choice(["", ".", "..", "...", " ", "a.b", "a/b"])
    return rng.choice([0, 1.5, None, b"abc", {"a": 1}, object()])


def _lora_bad(rng: random.Random):
    field, values = rng.choice(
        [
            ("r", [0, -1, 1.5, "8", True, None, 11, 10**9, -(10**9), math.nan]),
            ("alpha", [-1, math.nan, math.inf, "16", None, -math.inf]),
            ("dropout", [-0.1, 1.0, 2, math.nan, "0.1", None]),
            ("bias", ["bogus", 1, None, ""]),
            ("init", ["bogus", 3, ""]),
            ("target_modules", [5, [""], ["no_such_layer"], [], [1, 2]]),
            ("layers_to_transform", [-1, "0", [7], [0.5]]),
        ]
    )
    return field, rng.choice(values)


def _tree(root):
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A good adapter, saved once, whose bytes every case checks afterwards."""
    folder = tmp_path_factory.mktemp("fuzz") / "good"
    torch.manual_seed(0)
    get_peft_model(MLP.build(), LoraConfig(r=4, init="random", target_modules=["0", "2"])).save_pretrained(
        folder
    )
    return folder


def _expect_error(action, *needles):
    with pytest.raises(PEFTKIT_ERRORS) as info:
        action()
    message = str(info.value)
    assert any(n in message for n in needles), f"{message!r} names none of {needles}"
    return message


def test_fuzz_adapter_names(good, tmp_path):
    rng = random.Random(13)
    model = get_peft_model(MLP.build(), LoraConfig(r=4, target_modules=["0", "2"]))
    before, good_bytes = _tree(tmp_path), _tree(good)
    entries = [
        lambda n: model.add_adapter(n, LoraConfig(r=2, target_modules=["0"])),
        lambda n: model.set_adapter(n),
        lambda n: model.delete_adapter(n),
        lambda n: model.save_pretrained(tmp_path / "out", selected_adapters=[n]),
        lambda n: model.load_adapter(good, adapter_name=n),
        lambda n: PeftModel.from_pretrained(MLP.build(), good, adapter_name=n),
        lambda n: get_peft_model(MLP.build(), LoraConfig(r=2, target_modules=["0"]), adapter_name=n),
    ]
    for i in range(N_NAMES):
        name = _bad_name(rng)
        if isinstance(name, str) and name.startswith("/ABS/"):
            name = str(tmp_path / "outside" / name[5:])
        entry = entries[i % len(entries)]
        message = _expect_error(lambda e=entry, n=name: e(n), "allowed: 1 to 64")
        assert "adapter_name" in message, (i, message)
    assert list(model.peft_config) == ["default"], "no refused name left an adapter behind"
    assert _tree(tmp_path) == before and _tree(good) == good_bytes


def test_fuzz_config_values(tmp_path):
    rng = random.Random(14)
    for _ in range(N_LORA):
        field, value = _lora_bad(rng)
        options = {"r": 4, "target_modules": ["0", "2"], field: value}

        def apply(options=options):
            get_peft_model(MLP.build(), LoraConfig(**options))

        _expect_error(apply, f"`{field}`", field)
    gpt2 = TINY_MODELS["gpt2"]
    for _ in range(N_PROMPT):
        n = rng.choice([0, -1, 33, 10**9, 2**63, "20", 2.5, None, True])
        _expect_error(
            lambda n=n: get_peft_model(gpt2.build(), PromptTuningConfig(num_virtual_tokens=n)),
            "num_virtual_tokens",
        )
    assert list(tmp_path.iterdir()) == []


def _mutate_weights(rng: random.Random, data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    kind = rng.randrange(6)
    if kind == 0:  # truncated anywhere
        return data[: rng.randrange(len(data))]
    if kind == 1:  # random bytes
        return rng.randbytes(rng.randrange(0, 2 * len(data)))
    if kind == 2:  # a header length that lies
        return struct.pack("<Q", rng.choice([0, 1, length + 8, length * 1000, 2**40, 2**64 - 1])) + data[8:]
    if kind == 3:  # garbage inside the header's JSON
        i = rng.randrange(8, 8 + length)
        return data[:i] + rng.choice([b"{", b"}", b'"', b"\xff", b"\x00"]) + data[i + 1 :]
    if kind == 4:  # trailing bytes
        return data + rng.randbytes(rng.randint(1, 64))
    return data[:8] + data[8 : 8 + length] + data[8 + length :][: rng.randrange(1, len(data) - 8 - length)]


def _mutate_config(rng: random.Random, text: str) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return text.encode()[: rng.randrange(len(text))]
    if kind == 1:
        return json.dumps(rng.choice([[], [1], "lora", 3, None, True, 1.5])).encode()
    if kind == 2:
        return rng.randbytes(rng.randint(0, 200))
    return b"\xef\xbb\xbf" + text.encode() if rng.random() < 0.5 else text.encode()[::-1]


def _mutate_tensors(rng: random.Random, config: dict, tensors: dict) -> tuple[dict, dict, str]:
    key = rng.choice(sorted(tensors))
    kind = rng.randrange(7)
    tensors = dict(tensors)
    if kind == 0:
        tensors[key] = tensors[key].to(rng.choice([torch.int64, torch.int32, torch.bool, torch.uint8]))
    elif kind == 1:
        tensors[key] = (
            tensors[key]
            .clone()
            .view(-1)
            .index_fill(0, torch.tensor([0]), rng.choice([math.nan, math.inf]))
            .view_as(tensors[key])
        )
    elif kind == 2:
        tensors[key + rng.choice(["", ".x", "_extra"]) + "2"] = torch.zeros(rng.randint(1, 50))
    elif kind == 3:
        del tensors[key]
    elif kind == 4:
        tensors[key] = torch.zeros(*[d + rng.randint(1, 3) for d in tensors[key].shape])
    elif kind == 5:
        config = {**config, "r": rng.choice([0, -3, "4", 11, 10**9, None, 2.5])}
        return config, tensors, "`r`"
    else:
        config = {
            **config,
            rng.choice(["peft_type", "target_modules", "lora_alpha", "lora_dropout"]): rng.choice(
                [5, "??", [], None, -1]
            ),
        }
        return config, tensors, ckpt.CONFIG_NAME
    return config, tensors, key.split(".")[-2] if kind != 2 else "unexpected"


def test_fuzz_adapter_files(good, tmp_path):
    rng = random.Random(15)
    good_bytes = _tree(good)
    weights, text = (good / ckpt.WEIGHTS_NAME).read_bytes(), (good / ckpt.CONFIG_NAME).read_text()
    config, tensors = ckpt.read_adapter(good)
    cases = 0
    for i in range(N_WEIGHTS + N_CONFIGS + N_TENSORS):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        (folder / ckpt.CONFIG_NAME).write_text(text)
        (folder / ckpt.WEIGHTS_NAME).write_bytes(weights)
        if i < N_WEIGHTS:
            (folder / ckpt.WEIGHTS_NAME).write_bytes(_mutate_weights(rng, weights))
            needles = (ckpt.WEIGHTS_NAME,)
        elif i < N_WEIGHTS + N_CONFIGS:
            (folder / ckpt.CONFIG_NAME).write_bytes(_mutate_config(rng, text))
            needles = (ckpt.CONFIG_NAME,)
        else:
            bad_config, bad_tensors, needle = _mutate_tensors(rng, config, tensors)
            ckpt.write_adapter(folder, bad_config, bad_tensors)
            needles = (needle, ckpt.CONFIG_NAME, str(folder))
        before = _tree(tmp_path)
        _expect_error(lambda f=folder: PeftModel.from_pretrained(MLP.build(), f), *needles)
        assert _tree(tmp_path) == before, f"case {i}: loading wrote something"
        cases += 1
    assert cases == N_WEIGHTS + N_CONFIGS + N_TENSORS and _tree(good) == good_bytes
    PeftModel.from_pretrained(MLP.build(), good)  # the good adapter still loads
