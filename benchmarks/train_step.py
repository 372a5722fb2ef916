"""Worker: one training step (forward + backward + AdamW step) and the peak memory of training.

    python -m benchmarks.train_step --library {peftkit,hf,full} --model {bert,gpt2,llama}
                                    [--method {lora,prompt_tuning,prefix_tuning}]

``peftkit`` / ``hf``: LoRA r=8 alpha=16 on all linear layers (``--method lora``, the default), or prompt /
prefix tuning with 20 virtual tokens (causal LMs; the model then has 20 more position embeddings), AdamW
over the trainable parameters only.
``full``: the plain model, every parameter trained (the reference LoRA is meant to beat on memory).

Time: after ``warmup`` untimed steps (which also create AdamW's state), the median wall time of ``steps``
timed steps, each ``zero_grad(set_to_none=True); loss = model(**batch).loss; loss.backward(); opt.step()``.

Memory: the process's resident-set high-water mark (VmHWM) is reset just before the model is built, and read
after the last step; ``peak_train_mib`` is that peak minus the resident memory at the reset, i.e. the memory
the model, its adapter, gradients, optimizer state and activations added at their peak. The imports (HF
PEFT pulls in more modules than peftkit) are left out; ``ru_maxrss_mib`` (the whole process's peak, imports
included) is reported as well. To make the baseline fair, a tiny model of the same class is first run
through one step untimed (see ``common.preload``).
"""

from __future__ import annotations

import resource

import torch

from benchmarks import common

STEPS, WARMUP = 10, 2


def main() -> None:
    args = common.worker_args(__doc__.splitlines()[0], (*common.LIBRARIES, "full"), methods=True)
    common.setup()
    common.preload(
        args.model, args.library, args.method
    )  # imports and one-time set-up stay out of the baseline
    batch = common.make_batch(args.model)

    baseline = common.rss_mib()
    common.reset_peak_rss()
    model = common.build_model(args.model, common.model_size(args.method))
    layers: list[str] = []
    if args.library != "full":
        model = common.wrap(args.library, model, args.model, args.method)
        if args.method == "lora":
            layers = common.wrapped_layer_paths(args.library, model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()

    steps, warmup = (3, 1) if args.quick else (STEPS, WARMUP)
    for _ in range(warmup):
        step()
    times = [common.timed(step) for _ in range(steps)]
    peak = common.peak_rss_mib()

    common.emit(
        {
            "measurement": "train" if args.method == "lora" else args.method,
            "library": args.library,
            "model": args.model,
            "step": common.summarise(times),
            "peak_train_mib": peak - baseline,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable_params": common.trainable_count(model),
            "wrapped_layers": layers,
        }
    )


if __name__ == "__main__":
    main()
