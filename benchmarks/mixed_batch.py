"""Worker: a mixed batch (16 rows, each with a different one of 16 adapters) vs the same batch on one adapter.

    python -m benchmarks.mixed_batch --library {peftkit,hf} --model {llama,bert,gpt2}

The model carries 16 LoRA adapters (r=8, alpha=16, all linear layers; B set non-zero, different per
adapter). One batch of 16 x 128 tokens is run in eval mode under ``torch.no_grad()``:

- ``mixed``: ``model(input_ids=..., adapter_names=["a0", ..., "a15"])`` (row i through adapter ``a<i>``;
  both libraries take ``adapter_names`` in ``forward``);
- ``single``: the same batch with ``a0`` active and no ``adapter_names`` (the ordinary one-adapter path).

The two are timed in alternating blocks in the same process; throughput is rows x tokens / median latency.
"""

from __future__ import annotations

import torch

from benchmarks import common

ADAPTERS = 16
ROUNDS, CALLS, WARMUP = 3, 3, 1


def main() -> None:
    args = common.worker_args(__doc__.splitlines()[0], common.LIBRARIES)
    common.setup()
    common.preload(args.model, args.library)
    batch = common.make_batch(args.model, rows=ADAPTERS, with_labels=False)
    names = [f"a{i}" for i in range(ADAPTERS)]

    model = common.wrap_lora(args.library, common.build_model(args.model), args.model, adapter=names[0])
    for name in names[1:]:
        common.add_lora(args.library, model, args.model, name)
    model.set_adapter(names[0])
    model.eval()
    torch.manual_seed(common.SEED)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.normal_(std=0.02)

    def single() -> None:
        with torch.no_grad():
            model(**batch)

    def mixed() -> None:
        with torch.no_grad():
            model(**batch, adapter_names=names)

    def nothing() -> None:
        pass

    variants = {"single": (nothing, single, nothing), "mixed": (nothing, mixed, nothing)}
    rounds, calls, warmup = (1, 2, 1) if args.quick else (ROUNDS, CALLS, WARMUP)
    latency = common.interleaved_medians(variants, warmup=warmup, rounds=rounds, calls=calls)

    common.emit(
        {
            "measurement": "mixed",
            "library": args.library,
            "model": args.model,
            "rows": ADAPTERS,
            "tokens": common.TOKENS,
            **latency,
        }
    )


if __name__ == "__main__":
    main()
