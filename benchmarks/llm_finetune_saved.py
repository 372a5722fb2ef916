"""What one training step of ``benchmarks.llm_finetune`` keeps for its backward pass, tensor by tensor.

    MALLOC_MMAP_THRESHOLD_=65536 nice -n 10 .venv/bin/python -m benchmarks.llm_finetune_saved --library hf

Runs the benchmark's forward and loss on its widest batch (the 8 longest chat pairs, as the same-batch peak
of ``benchmarks.llm_finetune_worker``) with ``torch.autograd.graph.saved_tensors_hooks`` recording every
tensor autograd keeps, grouped by the kind of module that was running, the last dimension and the dtype,
each storage counted once (q, k and v saving the same input count it once). Then the backward, and the step's peak of
the resident set above what was alive before it, as the benchmark measures it. Load-independent: bytes.
"""

from __future__ import annotations

import argparse
import collections
import os

import torch

from benchmarks.llm_finetune_worker import _data, _load_model, _same_batch_peak


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    if tensor.device.type == "meta" or tensor.is_sparse:
        return None
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def saved_by_module(model: torch.nn.Module, step) -> tuple[dict, int]:
    """Bytes and count of the distinct storages autograd saves while ``step()`` runs its forward, by (module
    class, last dimension, dtype), and their total in bytes; the model's parameters are left out."""
    running: list[str] = []
    handles = []
    for path, module in model.named_modules():
        if any(part == "base_layer" or part.startswith("lora_") for part in path.split(".")):
            continue  # a hook on the layer an adapter wraps would turn its fused path off
        kind = type(module).__name__
        handles.append(module.register_forward_pre_hook(lambda m, a, k=kind: running.append(k)))
        handles.append(module.register_forward_hook(lambda m, a, o: running.pop() and None))
    seen = {_storage_key(p) for p in model.parameters()}  # weights are alive anyway
    table: dict[tuple[str, str, str], list[int]] = collections.defaultdict(lambda: [0, 0])

    def pack(tensor):
        key = _storage_key(tensor)
        if key is not None and key not in seen:
            seen.add(key)
            where = (running[-1] if running else "-", tuple(tensor.shape[-1:]), str(tensor.dtype))
            table[where][0] += key[1]
            table[where][1] += 1
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        for handle in handles:
            handle.remove()
    return table, sum(size for size, _ in table.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", choices=("peftkit", "hf"), default="peftkit")
    parser.add_argument("--method", choices=("lora", "qlora"), default="lora")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        parser.error(
            "set MALLOC_MMAP_THRESHOLD_=65536 as benchmarks.llm_finetune does, or the peak means little"
        )
    torch.set_num_threads(1)
    model_dir, train, _, collate = _data(args)
    lengths = [int(collate([r])["attention_mask"].sum()) for r in train]
    widest = collate(
        [train[i] for i in sorted(range(len(train)), key=lambda i: -lengths[i])[: args.batch_size]]
    )
    model = _load_model(args.library, args.method, model_dir, cuda=False)
    model.train()
    torch.manual_seed(args.seed)
    if args.library == "peftkit":
        from peftkit.losses.language_model import fused_training_loss

        def loss():
            return fused_training_loss(model, model, widest)
    else:

        def loss():
            return model(**widest).loss

    kept = []
    table, total = saved_by_module(model, lambda: kept.append(loss()))
    kept.pop().backward()
    model.zero_grad(set_to_none=True)
    print(f"batch {tuple(widest['input_ids'].shape)}; saved for backward: {total / 2**20:,.1f} MiB in all")
    for (module, last, dtype), (size, count) in sorted(table.items(), key=lambda kv: -kv[1][0]):
        if size >= 2**20:
            print(f"{size / 2**20:10,.1f} MiB  {count:5d} tensors  {module:28s} last dim {last!s:8s} {dtype}")

    def step():
        loss().backward()

    print(f"same-batch step peak above what was alive: {_same_batch_peak(step, False):,.1f} MiB")


if __name__ == "__main__":
    main()
