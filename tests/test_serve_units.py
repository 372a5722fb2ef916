"""The serving parts on their own: the batch KV cache layout, float32 decode steps of a mixed batch against
each row alone, incremental text with stop strings, sampling, and where adapters may come from."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.config import ConfigError
from peftkit.layer import BASE_ROW
from peftkit.serve.batch import Runner
from peftkit.serve.kv import BatchCache
from peftkit.serve.registry import Registry, adapter_directory
from peftkit.serve.sampling import SamplingParams, TextStream, next_tokens
from peftkit.serve.sequence import Sequence
from tests.tiny_models import TINY_MODELS

HEADS, DIM, LAYERS = 2, 4, 3


def _row_cache(length: int, seed: int) -> DynamicCache:
    generator = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for layer in range(LAYERS):
        keys = torch.randn(1, HEADS, length, DIM, generator=generator)
        cache.update(keys, keys + 100, layer)
    return cache


def _row(cache: BatchCache, row: int, layer: int = 0) -> torch.Tensor:
    length = cache.lengths[row]
    return cache.cache.layers[layer].keys[row, :, cache.width - length :]


def test_batch_cache_right_aligns_rows_pads_with_zeros_and_trims_when_rows_leave():
    originals = {length: _row_cache(length, length).layers[1].keys[0].clone() for length in (3, 7, 5)}
    cache = BatchCache()
    cache.join(_row_cache(3, 3), [3])
    cache.join(_row_cache(7, 7), [7])  # a wider row joins later: the old one is padded
    cache.join(_row_cache(5, 5), [5])
    assert cache.lengths == [3, 7, 5] and cache.width == 7
    for row, length in enumerate(cache.lengths):
        assert torch.equal(_row(cache, row, layer=1), originals[length])
        assert torch.equal(cache.cache.layers[1].values[row, :, 7 - length :], originals[length] + 100)
        padding = cache.cache.layers[1].keys[row, :, : cache.width - length]
        assert torch.count_nonzero(padding) == 0
    mask, positions = cache.step_inputs(torch.device("cpu"))
    assert mask.tolist()[0] == [0, 0, 0, 0, 1, 1, 1, 1] and mask.shape == (3, 8)
    assert positions.flatten().tolist() == [3, 7, 5]

    cache.keep([2, 0])  # the widest row left: two columns nobody uses go
    assert cache.lengths == [5, 3] and cache.width == 5
    assert cache.cache.layers[2].keys.shape == (2, HEADS, 5, DIM)
    assert torch.equal(_row(cache, 0, layer=1), originals[5])
    assert torch.equal(_row(cache, 1, layer=1), originals[3])
    cache.keep([])
    assert cache.cache is None and cache.width == 0


@pytest.mark.parametrize("headroom", [64, 1])
def test_batch_cache_steps_joins_and_leaves_keep_every_row_equal_to_its_own_concatenated_cache(
    monkeypatch, headroom
):
    """A random run of decode steps, joins (narrower and wider than the window) and leaves (from the front,
    the middle, the end): after each, every row's last ``length`` columns equal that row's keys and values
    concatenated alone, and the step's window is exactly as wide as the longest row. Headroom 1: the
    buffers slide back or grow at nearly every step."""
    monkeypatch.setattr("peftkit.serve.kv.HEADROOM", headroom)
    generator = torch.Generator().manual_seed(0)
    cache, reference, seed = BatchCache(), [], 100
    moves = [3, "step", 6, "step", "step", 2, "step", [1, 2], "step", 9, "step", [2, 0], "step", [1], "step"]
    for move in [*moves, [], 4, "step", "step"]:
        if isinstance(move, int):  # a row of this many prompt tokens joins
            seed += 1
            cache.join(_row_cache(move, seed), [move])
            reference.append([_row_cache(move, seed).layers[i].keys[0] for i in range(LAYERS)])
        elif isinstance(move, list):  # these rows stay, in this order
            cache.keep(move)
            reference = [reference[i] for i in move]
        else:
            cache.step_inputs(torch.device("cpu"))
            for layer in range(LAYERS):
                keys = torch.randn(cache.rows, HEADS, 1, DIM, generator=generator)
                window, values = cache.cache.update(keys, keys + 100, layer)
                assert window.shape[2] == values.shape[2] == cache.width + 1
                for row in range(cache.rows):
                    reference[row][layer] = torch.cat([reference[row][layer], keys[row]], dim=1)
            cache.advance()
        assert cache.lengths == [r[0].shape[1] for r in reference]
        if cache.rows:
            assert cache.cache.get_seq_length() == cache.width
        for row in range(cache.rows):
            for layer in range(LAYERS):
                assert torch.equal(_row(cache, row, layer), reference[row][layer])
                length = cache.lengths[row]
                stored = cache.cache.layers[layer].values[row, :, cache.width - length :]
                assert torch.equal(stored, reference[row][layer] + 100)


def test_batch_cache_grows_its_rows_only_when_they_do_not_fit():
    """A wider row joining widens the window without growing the rows' capacity; a row beyond it doubles it."""
    cache = BatchCache(row_capacity=2)
    cache.join(_row_cache(3, 1), [3])
    cache.join(_row_cache(9, 2), [9])  # wider than the window and its free columns
    assert cache.key_buffers[0].shape[0] == 2 and cache.width == 9
    cache.join(_row_cache(2, 3), [2])
    assert cache.key_buffers[0].shape[0] == 4 and cache.lengths == [3, 9, 2]
    assert torch.equal(_row(cache, 1), _row_cache(9, 2).layers[0].keys[0])


def _sequence(adapter: str, ids: list[int]) -> Sequence:
    return Sequence(
        adapter=adapter,
        prompt_ids=ids,
        max_tokens=8,
        params=SamplingParams(temperature=0.0),
        stream=TextStream(None, ()),
        emit=lambda event: None,
    )


@pytest.mark.parametrize("headroom", [64, 1])
def test_mixed_decode_steps_in_float32_equal_each_row_alone(monkeypatch, headroom):
    """Rows of different lengths and adapters (and the base) in one batch, prefilled together or alone, one
    leaving halfway: each row's logits at every step equal those of the same row run alone with its own
    adapter (``set_adapter``). Headroom 1: the cache's buffers slide back or grow at nearly every step."""
    monkeypatch.setattr("peftkit.serve.kv.HEADROOM", headroom)
    spec = TINY_MODELS["llama"]
    model = get_peft_model(spec.build(), LoraConfig(r=4, target_modules="all-linear"), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "lora_B" in key:
                parameter.normal_(std=0.3)
    model.eval()
    runner = Runner(model, {})
    prompts = {"a": [5, 9, 2, 7, 1], "b": [3, 4], BASE_ROW: [8, 8, 1, 2, 6, 6, 4, 3, 1]}
    rows = [_sequence(name, ids) for name, ids in prompts.items()]
    cache = BatchCache()
    logits_of = {row.adapter: [] for row in rows}
    with torch.inference_mode():
        # "a" and "b" prefilled together (left-padded), the base row alone, wider, joining after two steps
        for group, steps in ((rows[:2], 2), (rows[2:], 3), ([], 4)):
            if group:
                adapters = [None if row.adapter == BASE_ROW else row.adapter for row in group]
                logits, prefilled = runner.prefill(group, adapters)
                for row, row_logits in zip(group, logits, strict=True):
                    row.generated.append(int(row_logits.argmax()))
                cache.join(prefilled, [row.length for row in group])
            running = rows[: 2 if steps == 2 else 3] if steps != 4 else [rows[0], rows[2]]
            if steps == 4:
                cache.keep([0, 2])  # "b" leaves from the middle
            for _ in range(steps):
                step = runner.step_logits(running, cache)
                for row, row_logits in zip(running, step, strict=True):
                    logits_of[row.adapter].append(row_logits)
                    row.generated.append(int(row_logits.argmax()))
    for row in rows:
        ids = torch.tensor([row.prompt_ids + row.generated[:-1]])
        if row.adapter == BASE_ROW:
            with model.disable_adapter():
                alone = model(input_ids=ids).logits[0]
        else:
            model.set_adapter(row.adapter)
            alone = model(input_ids=ids).logits[0]
        assert row.generated[0] == int(alone[len(row.prompt_ids) - 1].argmax())
        assert len(logits_of[row.adapter]) == len(row.generated) - 1 > 0
        for step, logits in enumerate(logits_of[row.adapter]):
            expected = alone[len(row.prompt_ids) + step]
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


class _Letters:
    """A tokenizer whose token i is the i-th character of a fixed text (each decodes on its own)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.calls = 0

    def decode(self, ids, **_) -> str:
        self.calls += 1
        return "".join(self.text[i] for i in ids)


@pytest.mark.parametrize(
    ("stop", "expected"), [((), "hello world, bye"), (("wor",), "hello "), (("o w", "bye"), "hell")]
)
def test_text_stream_holds_back_possible_stops_and_pieces_join_to_the_final_text(stop, expected):
    text = "hello world, bye"
    stream = TextStream(_Letters(text), stop)
    pieces = []
    for end in range(1, len(text) + 1):
        pieces.append(stream.push(list(range(end)), final=end == len(text)))
        if stream.stopped:
            break
        if stop == ("wor",) and end == len("hello wo"):
            assert "".join(pieces) == "hello "  # "wo" might begin "wor": held back
    assert "".join(pieces) == expected
    assert stream.stopped == bool(stop)


class _Bytes:
    """A byte-level tokenizer: token i is byte i; a character may span several tokens."""

    def decode(self, ids, **_) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_waits_for_split_characters_and_matches_a_real_tokenizer():
    text = "naïve ✓ café, ok"
    ids = list(text.encode())
    stream = TextStream(_Bytes(), ())
    pieces = [stream.push(ids[:end], final=end == len(ids)) for end in range(1, len(ids) + 1)]
    assert "".join(pieces) == text and all("\ufffd" not in piece for piece in pieces)

    from transformers import AutoTokenizer

    from peftkit.assets import resolve_model

    wordpiece = AutoTokenizer.from_pretrained(resolve_model("minilm"))  # "##" pieces join the word before
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (200,), generator=generator).tolist()
    stream = TextStream(wordpiece, ())
    pieces = [stream.push(ids[:end], final=end == len(ids)) for end in range(1, len(ids) + 1)]
    assert "".join(pieces) == stream.decode(ids)


def test_sampling_greedy_top_p_and_seeds():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]))
    greedy = SamplingParams(temperature=0.0)
    assert next_tokens(logits, [greedy, greedy], [None, None]) == [0, 2]
    nucleus = SamplingParams(temperature=1.0, top_p=0.5, seed=0)
    draws = {next_tokens(logits[:1], [nucleus], [nucleus.generator()])[0] for _ in range(50)}
    assert draws == {0}  # 0.6 alone reaches top_p = 0.5
    wide = SamplingParams(temperature=1.0, top_p=1.0, seed=3)
    one, two = wide.generator(), wide.generator()
    first = [next_tokens(logits[1:], [wide], [one])[0] for _ in range(30)]
    assert first == [next_tokens(logits[1:], [wide], [two])[0] for _ in range(30)]
    assert set(first) == {0, 1, 2}


def test_adapter_directory_accepts_adapter_and_generation_run_folders(tmp_path):
    spec = TINY_MODELS["llama"]
    model = get_peft_model(spec.build(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "run" / "adapter")
    (tmp_path / "run" / "config.yaml").write_text("model: x\n")
    (tmp_path / "run" / "labels.json").write_text(json.dumps({"task": "causal-lm", "label_names": None}))
    assert adapter_directory(tmp_path / "run") == tmp_path / "run" / "adapter"
    assert adapter_directory(tmp_path / "run" / "adapter") == tmp_path / "run" / "adapter"
    (tmp_path / "run" / "labels.json").write_text(json.dumps({"task": "sequence-classification"}))
    with pytest.raises(ConfigError, match="sequence-classification run"):
        adapter_directory(tmp_path / "run")
    with pytest.raises(ConfigError, match="neither an adapter folder"):
        adapter_directory(tmp_path)

    registry = Registry(PeftModel(spec.build(), None), max_resident=2, roots=[tmp_path / "run"])
    assert registry.allowed("adapter") == (tmp_path / "run" / "adapter").resolve()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run" / "link").symlink_to(tmp_path / "elsewhere")  # inside the root, pointing out of it
    for escape in ("../run2", "link", str(tmp_path / "run" / "link"), "/etc"):
        with pytest.raises(PermissionError, match="outside the allowed adapter roots"):
            registry.allowed(escape)


@pytest.mark.parametrize("stop", [(), ("d, b",)])
def test_a_whole_response_gets_one_event_with_the_text_a_stream_gets_in_pieces(stop):
    """Non-streaming requests: no event (no thread hand-off) before the end, and the same final text and
    finish reason as a streaming one; without stop strings nothing is decoded before the end."""
    text = "hello world, bye"

    def run(streaming: bool) -> tuple[list, _Letters]:
        events, letters = [], _Letters(text)
        sequence = _sequence("a", [1])
        sequence.max_tokens, sequence.final_only = len(text), not streaming
        sequence.stream, sequence.emit = TextStream(letters, stop, incremental=streaming), events.append
        for token in range(len(text)):
            if sequence.add_token(token):
                break
        return events, letters

    streamed, _ = run(True)
    whole, letters = run(False)
    assert len(whole) == 1 and len(streamed) > 1
    assert whole[0].text == "".join(e.text for e in streamed) == ("hello worl" if stop else text)
    assert whole[0].finish_reason == streamed[-1].finish_reason == ("stop" if stop else "length")
    if not stop:
        assert letters.calls == 2  # decoded once, at the end (the empty window before it, and the whole)
