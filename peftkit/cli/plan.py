"""`peftkit plan`: before training, every method's trainable parameters, adapter file size, predicted peak
training memory (by component, with and without gradient checkpointing), inference overhead, and the method
to choose under the given constraints. The model is built on the meta device: no weights are loaded."""

from __future__ import annotations

import argparse

METHODS_HELP = "methods to plan (default: every method peftkit train knows)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("plan", description=__doc__)
    parser.add_argument(
        "--model", default="minilm", help="a bundled model (minilm, smollm2) or a folder with config.json"
    )
    parser.add_argument(
        "--task",
        choices=("sequence-classification", "token-classification", "causal-lm", "seq2seq"),
        help="default: from the model's architecture",
    )
    parser.add_argument("--batch-size", type=int, help="rows per step (default: peftkit train's)")
    parser.add_argument(
        "--max-length", type=int, help="tokens per row, T (default: 64; peftkit train picks its own)"
    )
    parser.add_argument("--memory", help="memory available for training, e.g. 24GiB or 16GB")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where training would run")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights' dtype")
    parser.add_argument("--methods", nargs="+", help=METHODS_HELP)
    parser.add_argument("--num-labels", type=int, default=2, help="classes of a classification head")
    parser.add_argument("--tasks", type=int, default=1, help="tasks to serve from one base model")
    parser.add_argument("--zero-latency", action="store_true", help="inference must cost what the base costs")
    parser.add_argument(
        "--no-fused-loss",
        dest="fused_loss",
        action="store_false",
        help="plan the model's own loss (full logits), as peftkit train --no-fused-loss trains "
        "(default: the fused loss, where the model allows it, as peftkit train)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--chart", metavar="PNG", help="write memory per method, stacked by component")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftkit.planning import Settings, parse_bytes, plan

    given = {"batch_size": args.batch_size, "max_length": args.max_length}
    settings = Settings(
        **{name: value for name, value in given.items() if value is not None},
        model=args.model,
        task=args.task,
        memory=parse_bytes(args.memory) if args.memory else None,
        device=args.device,
        dtype=args.dtype,
        methods=tuple(args.methods or ()),
        num_labels=args.num_labels,
        tasks=args.tasks,
        zero_latency=args.zero_latency,
        fused_loss=args.fused_loss,
    )
    table = plan(settings)
    print(table.to_json() if args.json else table.render())
    if args.chart:
        print(f"chart: {table.chart(args.chart)}")
    return 0
