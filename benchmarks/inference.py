"""Worker: inference latency of the base model, unmerged LoRA and merged LoRA, in one process.

    python -m benchmarks.inference --library {peftkit,hf} --model {bert,gpt2,llama}

One forward pass of a batch of 8 x 128 tokens under ``torch.no_grad()`` in eval mode, no labels. Three
variants are timed in the same process, in alternating blocks (base, unmerged, merged, base, ...), so that
their ratios are paired and drift on the shared machine hits all three alike:

- ``base``: the plain transformers model (a copy of the weights taken before the library wraps them);
- ``unmerged``: the LoRA model, adapter applied as ``W0 x + s B A x`` in every wrapped layer;
- ``merged``: the same after ``merge_adapter()`` (``s B A`` folded into ``W0``), unmerged again after.

The adapter's B matrix is set non-zero so that merging really changes the weights.
"""

from __future__ import annotations

import copy

import torch

from benchmarks import common

ROUNDS, CALLS, WARMUP = 4, 3, 2


def main() -> None:
    args = common.worker_args(__doc__.splitlines()[0], common.LIBRARIES)
    common.setup()
    common.preload(args.model, args.library)
    batch = common.make_batch(args.model, with_labels=False)

    base = common.build_model(args.model).eval()
    model = common.wrap_lora(args.library, copy.deepcopy(base), args.model).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.normal_(std=0.02)

    def run(target: torch.nn.Module):
        def call() -> None:
            with torch.no_grad():
                target(**batch)

        return call

    def nothing() -> None:
        pass

    variants = {
        "base": (nothing, run(base), nothing),
        "unmerged": (nothing, run(model), nothing),
        "merged": (model.merge_adapter, run(model), model.unmerge_adapter),
    }
    rounds, calls, warmup = (1, 2, 1) if args.quick else (ROUNDS, CALLS, WARMUP)
    latency = common.interleaved_medians(variants, warmup=warmup, rounds=rounds, calls=calls)

    common.emit({"measurement": "inference", "library": args.library, "model": args.model, **latency})


if __name__ == "__main__":
    main()
