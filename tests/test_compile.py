"""torch.compile: a training step through peftkit's layers is one graph and computes what eager computes.

Each case compiles the whole wrapped model with ``fullgraph=True``, so any graph break (from peftkit or from
the model code) raises, then runs forward and backward and compares the loss and every trained tensor's
gradient with the same step in eager mode. The ``aot_eager`` backend runs dynamo and AOTAutograd (the very
forward and backward graphs inductor would compile, custom autograd nodes included) without generating code,
so a case takes seconds; one slow case runs inductor itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.registry import lookup_backend
from torch._functorch.aot_autograd import aot_module_simplified

from peftkit import (
    BottleneckConfig,
    FusionConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    PTuningV2Config,
    get_peft_model,
)
from peftkit.methods.lora import LoraLinear
from tests.tiny_models import TINY_MODELS

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}  # float32; the graphs reorder no reductions, inductor may fuse some
MIXED_ROWS = ["a", "b", "__base__"]  # tiny_models.BATCH rows: two adapters and the base model


def _loss(model, batch, **kwargs) -> torch.Tensor:
    return model(**batch, **kwargs).logits.float().pow(2).mean()


def _step(forward, model, batch, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward (``forward``: the model or its compiled form) and backward once: the loss and the gradient of
    every tensor ``model`` trains (then cleared)."""
    loss = _loss(forward, batch, **kwargs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_compiles_like_eager(model, batch, backend: str = "aot_eager", **kwargs) -> list:
    """Returns the graphs dynamo captured (one, or ``fullgraph`` would have raised)."""
    model.train()
    torch.manual_seed(0)
    eager_loss, eager_grads = _step(model, model, batch, **kwargs)
    graphs = []

    def recording(graph_module, example_inputs):
        graphs.append(graph_module)
        return lookup_backend(backend)(graph_module, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording, fullgraph=True)  # a graph break raises
    torch.manual_seed(0)
    loss, grads = _step(compiled, model, batch, **kwargs)
    torch.testing.assert_close(loss, eager_loss, **TOLERANCE)
    assert grads.keys() == eager_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], **TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")
    return graphs


def _fused_nodes(graphs: list) -> int:
    """How often the captured graphs apply a custom autograd node (peftkit's fused LoRA node)."""
    apply = torch.ops.higher_order.autograd_function_apply
    return sum(node.target is apply for graph in graphs for node in graph.graph.nodes)


def _random_lora(**fields) -> LoraConfig:
    return LoraConfig(r=4, init="random", **fields)  # B != 0: the adapter's path carries gradient to A


@pytest.mark.parametrize("family", ["bert", "llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_lora_training_step_compiles_as_one_graph_with_eager_gradients(family):
    """BERT classifier (nn.Linear, a trained head), LLaMA (GQA), GPT-2 (Conv1D: transposed weights). Under
    compile every LoRA layer runs the plain ops (the graph holds no custom autograd node), which inductor
    compiles faster than the fused node's own backward; eager keeps the fused node."""
    tiny = TINY_MODELS[family]
    model = get_peft_model(tiny.build(), _random_lora(target_modules="all-linear"))
    graphs = assert_compiles_like_eager(model, tiny.batch())
    layers = sum(isinstance(m, LoraLinear) for m in model.modules())
    assert len(graphs) == 1 and layers > 0
    assert _fused_nodes(graphs) == 0


@pytest.mark.slow
def test_lora_with_dropout_compiles_as_one_graph():
    """With dropout the adapter reads another tensor than the base layer (the node's second input)."""
    tiny = TINY_MODELS["llama"]
    model = get_peft_model(tiny.build(), _random_lora(dropout=0.1))
    model.train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss, grads = _step(compiled, model, tiny.batch())
    assert torch.isfinite(loss) and grads
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)


def _two_loras(tiny):
    model = get_peft_model(tiny.build(), _random_lora(), "a")
    model.add_adapter("b", LoraConfig(r=2, init="random"))
    return model


def _two_bottlenecks(tiny, **fields):
    model = get_peft_model(tiny.build(), BottleneckConfig(init="random", **fields), "a")
    model.add_adapter("b", BottleneckConfig(init="random", **fields))
    return model


def _two_ia3s(tiny):
    model = get_peft_model(tiny.build(), IA3Config(init="random"), "a")
    model.add_adapter("b", IA3Config(init="random"))
    return model


def _several_active(tiny):
    model = _two_loras(tiny)
    model.set_adapter(["a", "b"])
    return model


def _fusion(tiny):
    model = _two_bottlenecks(tiny)
    model.add_adapter("f", FusionConfig(adapters=("a", "b")))
    model.set_adapter("f")
    return model


def _lora_on_embeddings(tiny):
    targets = ("embed_tokens", "q_proj", "v_proj")
    model = get_peft_model(tiny.build(), _random_lora(target_modules=targets), "a")
    model.add_adapter("b", LoraConfig(r=2, init="random", target_modules=targets))
    return model


# name -> (build the wrapped tiny LLaMA, forward keywords). Slow cells are marked in the parametrisation.
CASES: dict[str, tuple[Callable, dict]] = {
    "lora-several-active": (_several_active, {}),
    "lora-mixed-batch": (_two_loras, {"adapter_names": MIXED_ROWS}),
    "lora-embedding-mixed-batch": (_lora_on_embeddings, {"adapter_names": MIXED_ROWS}),
    "ia3": (lambda t: get_peft_model(t.build(), IA3Config(init="random")), {}),
    "ia3-mixed-batch": (_two_ia3s, {"adapter_names": MIXED_ROWS}),
    "bottleneck-houlsby": (lambda t: _two_bottlenecks(t, placement="houlsby"), {}),
    "bottleneck-parallel": (lambda t: _two_bottlenecks(t, placement="parallel"), {}),
    "bottleneck-mixed-batch": (_two_bottlenecks, {"adapter_names": MIXED_ROWS}),
    "fusion": (_fusion, {}),
    "prompt-tuning": (lambda t: get_peft_model(t.build(), PromptTuningConfig(num_virtual_tokens=4)), {}),
    "prefix-tuning": (lambda t: get_peft_model(t.build(), PrefixTuningConfig(num_virtual_tokens=4)), {}),
    "p-tuning-mlp": (
        lambda t: get_peft_model(t.build(), PTuningConfig(num_virtual_tokens=4, encoder="mlp")),
        {},
    ),
    "p-tuning-v2": (lambda t: get_peft_model(t.build(), PTuningV2Config(num_virtual_tokens=4)), {}),
}
FAST = {"lora-mixed-batch", "bottleneck-mixed-batch", "prefix-tuning"}  # one per cause fixed; rest slow


@pytest.mark.parametrize(
    "case",
    [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in CASES],
)
def test_other_methods_compile_as_one_graph_with_eager_gradients(case):
    build, kwargs = CASES[case]
    tiny = TINY_MODELS["llama"]
    assert_compiles_like_eager(build(tiny), tiny.batch(), **kwargs)


@pytest.mark.slow
def test_inductor_compiled_lora_step_matches_eager():
    """The compiler users get by default (inductor: generated C++ kernels on CPU)."""
    tiny = TINY_MODELS["llama"]
    model = get_peft_model(tiny.build(), _random_lora(target_modules="all-linear"))
    assert_compiles_like_eager(model, tiny.batch(), backend="inductor")


@pytest.mark.slow
def test_trainer_with_torch_compile_trains_like_eager(tmp_path):
    """``TrainingArguments(torch_compile=True)`` (plain ``Trainer``): no graph break, the losses of eager."""
    from tests.test_trainer_integration import _train

    def losses(**overrides):
        torch.manual_seed(0)
        tiny = TINY_MODELS["llama"]
        model = get_peft_model(tiny.build(), _random_lora(target_modules=("q_proj", "v_proj")))
        _, train_losses, eval_loss = _train(model, "llama", tmp_path / str(len(overrides)), **overrides)
        return [*train_losses, eval_loss]

    eager = losses()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = losses(torch_compile=True, torch_compile_backend="aot_eager")
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    torch.testing.assert_close(compiled, eager, **TOLERANCE)


@pytest.mark.slow
def test_lora_step_compiled_with_dynamic_shapes_takes_new_lengths_without_breaks():
    """Batches of another length run the symbolic-shape graph (one recompile at most, no break)."""
    tiny = TINY_MODELS["llama"]
    model = get_peft_model(tiny.build(), _random_lora(target_modules="all-linear")).train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for length in (6, 9, 4):
        ids = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(length))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        want_loss, want_grads = _step(model, model, batch)
        loss, grads = _step(compiled, model, batch)
        torch.testing.assert_close(loss, want_loss, **TOLERANCE)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], **TOLERANCE)


class _ReferenceLora(nn.Module):
    """The textbook LoRA layer, written independently of peftkit: ``base(x) + s · B(A(dropout(x)))``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.A = nn.Linear(base.in_features, r, bias=False)
        self.B = nn.Linear(r, base.out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + self.scale * self.B(self.A(self.dropout(x)))


def _reference_lora_model(base: nn.Module, targets: list[str], r: int, alpha: float, dropout: float):
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = base.get_submodule(parent)
        setattr(owner, child, _ReferenceLora(getattr(owner, child), r, alpha, dropout))
    return base


def _aten_ops(model, batch) -> dict[str, Counter]:
    """The aten ops (call_function nodes, by target) of the forward and backward graphs AOTAutograd hands a
    compiler (inductor) for one training step of ``torch.compile(model, fullgraph=True)``."""
    graphs = {}

    def keep(kind):
        def compiler(graph_module, example_inputs):
            graphs[kind] = Counter(str(n.target) for n in graph_module.graph.nodes if n.op == "call_function")
            return make_boxed_func(graph_module.forward)

        return compiler

    def backend(graph_module, example_inputs):
        return aot_module_simplified(graph_module, example_inputs, keep("forward"), keep("backward"))

    torch._dynamo.reset()
    model.train()
    _loss(torch.compile(model, backend=backend, fullgraph=True), batch).backward()
    return graphs


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_lora_graph_has_no_more_aten_ops_than_a_plain_lora(dropout):
    """Structural check behind 'compiles no slower than Hugging Face PEFT': the forward and backward graphs
    inductor receives for peftkit's LoRA model hold no more aten ops (of any kind) than those of the same
    model with a plain ``base(x) + s · B(A(dropout(x)))`` layer on the same linear layers. Extra per-layer
    ops (an in-place add's copies, masks, casts) each cost compile time in every layer and block fusions."""
    tiny = TINY_MODELS["llama"]
    model = get_peft_model(tiny.build(), _random_lora(target_modules="all-linear", dropout=dropout))
    targets = [n.removeprefix("base_model.") for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert targets
    reference = _reference_lora_model(tiny.build(), targets, r=4, alpha=8, dropout=dropout)
    batch = tiny.batch()
    ours, theirs = _aten_ops(model, batch), _aten_ops(reference, batch)
    for kind in ("forward", "backward"):
        extra = ours[kind] - theirs[kind]  # the ops peftkit has more of, by kind
        assert sum(ours[kind].values()) <= sum(theirs[kind].values()), f"{kind}: peftkit adds {dict(extra)}"
        assert not extra, f"{kind} graph: ops peftkit adds over a plain LoRA: {dict(extra)}"
