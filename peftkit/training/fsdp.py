"""``peftkit train --fsdp``: the frozen base model sharded across processes with FSDP2 (``fully_shard``).

Each process holds ``1 / world_size`` of every parameter between uses. A transformer block's parameters are
all-gathered just before the block runs and freed again after it (forward and backward), so a process holds
its shard of the model plus, while the model runs, the root's parameters (embeddings, heads) and one block
in full, where DDP holds the whole model in every process all the time.
Adapters are parameters like any other: sharded, their gradients averaged across processes by
reduce-scatter, each process updating its own shard (the frozen base gets no gradients, nothing is
exchanged for it in the backward pass). The order of sharding follows PyTorch's FSDP2 recipe: every block
(the classes transformers lists in the model's ``_no_split_modules``, else the layers a ``ModuleList``
stacks) first, then the ``PeftModel`` as the
root, which gathers the rest (embeddings, output head, task head, prompt encoders) for each forward and
``generate`` call.

What is written stays the format of a one-process run: the adapter's full tensors and the optimizer's full
state are gathered (a collective: every process takes part) and only the main process writes them; a
checkpoint written with or without ``--fsdp`` resumes either way (at the same global batch). Evaluation runs on every process (each
forward is a collective), the main one reporting.

Source: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``; Zhao et al. 2023, "PyTorch FSDP",
arXiv:2304.11277; the per-parameter sharding of FSDP2 keeps frozen and trained parameters in one group).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from peftkit.config import ConfigError
from peftkit.methods import method_for_config
from peftkit.training.divergence import FiniteParameters


def check_shardable(model: nn.Module) -> None:
    """Raise ConfigError naming the adapter and the reason when ``model`` (a ``PeftModel``) cannot be
    sharded: a method that trains the base model's own parameters in place (BitFit, layer tuning, full
    fine-tuning, LoRA's ``bias``) keeps each adapter's values of those parameters beside the parameter
    objects (:mod:`peftkit.parameter_bank`), and sharding replaces those objects with shards."""
    for name, config in model.peft_config.items():
        in_place = model._bank.parameters_of(name)  # the bank is the cause: asked directly
        if in_place:
            method = method_for_config(config).name
            raise ConfigError(
                f"--fsdp cannot shard adapter {name!r} ({method}): it trains {len(in_place)} of the base "
                "model's own parameters in place (biases, whole blocks or every weight), whose per-adapter "
                "copies are kept by parameter object, and sharding replaces those objects. Train it "
                "without --fsdp (plain DDP), or choose a method whose trained tensors are its own "
                "(lora with bias='none', qlora, ia3, bottleneck, prompt methods)"
            )


def block_classes(model: nn.Module) -> set[str]:
    """The class names of the transformer blocks: transformers' ``_no_split_modules`` of the base model
    (what accelerate's FSDP auto-wrap uses too) or, where a model declares none, the class of the modules a
    ``ModuleList`` stacks (BERT's ``encoder.layer``)."""
    classes: set[str] = set()
    for module in model.modules():
        classes |= set(getattr(module, "_no_split_modules", None) or ())
    if not classes:
        for module in model.modules():
            kinds = {type(child).__name__ for child in module.children()}
            if isinstance(module, nn.ModuleList) and len(kinds) == 1:
                classes |= kinds
    return classes


def shard(model: nn.Module) -> int:
    """Shard ``model`` (a ``PeftModel``) in place across the default process group; the number of blocks
    sharded on their own (0: the whole model is gathered at once, still stored sharded).

    The device mesh lives where the parameters do: CPU (gloo) or CUDA (NCCL). Raises ConfigError as
    :func:`check_shardable` does. Build the optimizer afterwards: the parameters become ``DTensor`` shards.
    """
    import torch.distributed as dist

    check_shardable(model)
    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    classes = block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in classes and m is not model]
    for block in reversed(blocks):  # children before their parents (named_modules is pre-order)
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "generate")  # generate() gathers the root's parameters as forward
    return len(blocks)


def shard_run(model: nn.Module, wanted: bool, world_size: int, say: Callable[[str], None]) -> bool:
    """``peftkit train --fsdp``: shard ``model`` when ``wanted`` and launched as several processes; whether it
    was. Raises ConfigError as :func:`check_shardable` does, also with one process (the same run launched
    with more would fail)."""
    if not wanted:
        return False
    check_shardable(model)
    if world_size == 1:
        say("--fsdp: one process, nothing to shard (launch with torchrun or accelerate launch)")
        return False
    blocks = shard(model)
    say(f"fsdp: the model sharded across {world_size} processes, {blocks} blocks apart")
    return True


@contextlib.contextmanager
def in_turn(dist: Any, enabled: bool) -> Iterator[None]:
    """With ``enabled``, the processes (a :class:`~peftkit.training.distributed.Distributed`) run the block one
    after another, rank 0 first: loading the base and sharding it, so that one process at a time holds the
    whole model and a machine needs the memory of one full copy plus shards, not one full copy per process.
    Every process passes ``world_size`` barriers in all: ``rank`` before its turn, the rest after. Nothing in
    the block may be a collective."""
    turns = dist.world_size if enabled else 0
    for _ in range(min(dist.rank, turns)):
        dist.barrier()
    yield
    for _ in range(turns - min(dist.rank, turns)):
        dist.barrier()


class ShardedFiniteParameters(FiniteParameters):
    """:class:`~peftkit.training.divergence.FiniteParameters` over this process's shards, the verdict shared
    by every process (the first problem any of them found), so that all stop together or none does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.named = [(n, p.to_local() if isinstance(p, DTensor) else p) for n, p in self.named]

    def problem(self) -> str | None:
        """The first problem any process found in its shards (the same answer on every process); a
        collective."""
        import torch.distributed as dist

        found: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(found, super().problem())
        return next((problem for problem in found if problem is not None), None)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def whole_trained_parameters(model: nn.Module, keep: bool) -> Iterator[None]:
    """Inside the block, on a process with ``keep``, every trained parameter of a sharded ``model`` is whole
    (a plain tensor), so ``save_pretrained`` writes the file a one-process run writes, derived tensors
    included (a prefix encoder's output, a prompt ensemble's slice). The frozen base stays sharded.

    A collective: every process enters it (in the same order), those without ``keep`` only lend their
    shards. No forward pass may run inside. An unsharded model is left as it is."""
    swapped = []
    if isinstance(model, FSDPModule):
        for module in model.modules():  # the root stays gathered after a forward pass without backward
            if isinstance(module, FSDPModule):
                module.reshard()
        for module in model.modules():
            for name, parameter in list(module._parameters.items()):  # registered directly, as FSDP2 does
                if parameter is None or not parameter.requires_grad or not isinstance(parameter, DTensor):
                    continue
                whole = parameter.full_tensor().detach()
                if keep:
                    module._parameters[name] = nn.Parameter(whole)
                    swapped.append((module, name, parameter))
    try:
        yield
    finally:
        for module, name, parameter in swapped:
            module._parameters[name] = parameter


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded tensor gathered whole: the same layout and values as
    the state of a one-process run. A collective: every process must call it."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {key: _full(value) for key, value in entry.items()}
        for index, entry in sorted(state["state"].items())
    }
    return state


def shard_optimizer_state(trainer_state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """A checkpoint's full (one-process) optimizer state, in ``trainer_state["optimizer"]``, cut in place to
    this process's shards for ``optimizer.load_state_dict``: each tensor shaped like its parameter takes the
    parameter's placement (no communication: every process holds the full state). Tensors of other shapes
    (AdamW's ``step``) stay as they are."""
    state = trainer_state["optimizer"]
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for index, entry in state["state"].items():
        parameter = parameters[index]
        sharded[index] = {
            key: distribute_tensor(value, parameter.device_mesh, parameter.placements, src_data_rank=None)
            if isinstance(parameter, DTensor) and torch.is_tensor(value) and value.shape == parameter.shape
            else value
            for key, value in entry.items()
        }
    trainer_state["optimizer"] = {**state, "state": sharded}
