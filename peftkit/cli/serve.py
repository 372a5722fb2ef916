"""`peftkit serve`: one base model, many adapters, an OpenAI-compatible server with continuous batching
(and ``POST /v1/classify`` for classification and NER adapters).

    peftkit serve --model smollm2 --adapter qa=runs/qa --adapter sql=runs/sql
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "qa", "prompt": "What is LoRA?", "max_tokens": 32}'
"""

from __future__ import annotations

import argparse


def _adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (a run or adapter folder), got {text!r}")
    return name, path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("serve", description=__doc__)
    parser.add_argument("--model", required=True, help="a bundled model (smollm2) or a local model folder")
    parser.add_argument(
        "--adapter",
        action="append",
        type=_adapter,
        default=[],
        metavar="NAME=DIR",
        help="an adapter to serve as model NAME: a `peftkit train` run folder or an adapter folder (repeatable); "
        "generation runs answer /v1/completions and /v1/chat/completions, classification and NER runs /v1/classify",
    )
    parser.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder clients may load adapters from at run time (POST /v1/adapters); none: run-time loading off",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument("--max-adapters", type=int, default=64, help="adapters resident at once (LRU beyond)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows in the running decode batch")
    parser.add_argument("--max-tokens", type=int, default=1024, help="the most tokens a request may ask for")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 answers")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` (default: $PEFTKIT_API_KEY if set, else no key)",
    )
    parser.add_argument("--served-model-name", default=None, help="the base model's name in requests")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        from peftkit.serve import Engine, ServeConfig, serve
        from peftkit.serve.engine import api_key_from_environment
    except ImportError as error:  # FastAPI / uvicorn are an extra
        raise ValueError(f"peftkit serve needs its extra: pip install 'peftkit[serve]' ({error})") from None

    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise ValueError("each --adapter NAME must be unique")
    config = ServeConfig(
        model=args.model,
        adapters=adapters,
        adapter_roots=args.adapter_root,
        max_adapters=args.max_adapters,
        max_batch_size=args.max_batch_size,
        max_tokens=args.max_tokens,
        max_queue=args.max_queue,
        api_key=args.api_key or api_key_from_environment(),
        served_name=args.served_model_name,
    )
    engine = Engine.load(config)
    print(
        f"peftkit serve: {engine.base_name} with adapters {sorted(adapters)} on http://{args.host}:{args.port}"
    )
    serve(engine, host=args.host, port=args.port)
    return 0
