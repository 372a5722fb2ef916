"""``peftkit serve``: one base model, many adapters, an OpenAI-compatible HTTP server with continuous
batching across adapters (needs the ``serve`` extra: ``pip install peftkit[serve]``).

    engine = Engine.load(ServeConfig(model="smollm2", adapters={"qa": "runs/qa", "sql": "runs/sql"}))
    serve(engine, port=8000)                      # or: with BackgroundServer(engine) as url: ...

Layout: ``engine`` (model, tokenizer, limits), ``scheduler`` (continuous batching) over ``batch`` (prefill
and decode steps) and ``kv`` (the batch's per-row cache), ``registry`` (adapters, LRU residency),
``sampling``, ``sequence``, ``app`` (routes) with ``schemas`` and ``errors``, ``metrics``, ``server``.
"""

from peftkit.serve.engine import Engine, ServeConfig
from peftkit.serve.server import BackgroundServer, serve

__all__ = ["BackgroundServer", "Engine", "ServeConfig", "serve"]
