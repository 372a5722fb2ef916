"""The HTTP surface: OpenAI-compatible completions, chat completions and models list, adapter load / unload,
health and Prometheus metrics. Handlers only translate: requests become sequences for the scheduler, the
scheduler's events become response bodies or server-sent events."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from peftkit.config import ConfigError
from peftkit.model import AdapterError
from peftkit.serve import schemas
from peftkit.serve.engine import Engine
from peftkit.serve.errors import ApiError, install
from peftkit.serve.registry import AdapterNotFound
from peftkit.serve.sampling import SamplingParams
from peftkit.serve.scheduler import QueueFull
from peftkit.serve.sequence import Event

DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="peftkit serve", version="1")
    install(app)

    async def authorised(request: Request) -> None:
        key = engine.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), key.encode()):
            raise ApiError(
                401, "missing or wrong API key (send `Authorization: Bearer <key>`)", code="invalid_api_key"
            )

    guarded = [Depends(authorised)]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.base_name, "adapters": len(engine.registry.names())}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        cards = [schemas.model_card(engine.base_name, "peftkit", None)]
        cards += [schemas.model_card(name, "peftkit", engine.base_name) for name in engine.registry.names()]
        cards += [
            schemas.model_card(name, "peftkit", engine.base_name, engine.classifier.adapters[name].task)
            for name in engine.classifier.names()
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: schemas.CompletionRequest, request: Request):
        adapter = _served(engine, body.model)
        ids = _param(lambda: engine.text_prompt(body.prompt), "prompt")
        rid = schemas.completion_id()
        return await _answer(
            engine, request, body, (adapter, ids, "prompt"), body.max_tokens, schemas.completion_body, rid
        )

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(body: schemas.ChatCompletionRequest, request: Request):
        adapter = _served(engine, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = _param(lambda: engine.chat_prompt(adapter, messages), "messages")
        rid = schemas.chat_id()
        return await _answer(
            engine, request, body, (adapter, ids, "messages"), body.requested_tokens(), schemas.chat_body, rid
        )

    _add_adapter_routes(app, engine, guarded)
    _add_classify_route(app, engine, guarded)
    return app


def _add_classify_route(app: FastAPI, engine: Engine, guarded: list) -> None:
    """``POST /v1/classify``: labels and scores per text from a classification adapter; requests waiting
    together share passes across adapters (see :mod:`peftkit.serve.classify`)."""

    @app.post("/v1/classify", dependencies=guarded)
    async def classify(body: schemas.ClassifyRequest) -> dict:
        if body.model not in engine.classifier.names():
            _served(engine, body.model)  # 404 for a name nobody serves
            raise ApiError(
                400,
                f"{body.model!r} generates text (use /v1/completions); /v1/classify serves the classification "
                f"adapters {engine.classifier.names()}",
                param="model",
            )
        job = _param(lambda: engine.classify_job(body.model, body.input), "input")
        tokens = sum(map(len, job.ids))
        start = time.perf_counter()
        try:
            engine.scheduler.submit_classify(job)
        except QueueFull as error:
            raise ApiError(429, f"the server is busy: {error}; retry later") from None
        try:
            results = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:  # the client went away: a job not yet run is dropped
            job.future.cancel()
            raise
        except Exception as error:
            engine.metrics.requests.labels(body.model, "error").inc()
            status, message = _failure(error)
            raise ApiError(status, message, param="model" if status == 404 else None) from None
        engine.metrics.classified(body.model, len(job.ids), tokens, time.perf_counter() - start)
        task = (
            engine.classifier.adapters[body.model].task if body.model in engine.classifier.adapters else None
        )
        return schemas.classify_body(body.model, task, results, tokens)


def _add_adapter_routes(app: FastAPI, engine: Engine, guarded: list) -> None:
    """``POST /v1/adapters`` (load an adapter from an allowed folder) and ``DELETE /v1/adapters/{name}``."""

    @app.post("/v1/adapters", dependencies=guarded)
    async def load_adapter(request: Request) -> JSONResponse:
        try:
            body = schemas.AdapterLoadRequest.parse(await _json(request))
        except ValidationError as error:
            first = error.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise ApiError(400, f"`{param}`: {first['msg']}", param=param) from None
        if body.name == engine.base_name:
            raise ApiError(409, f"{body.name!r} is the base model's name", param="name")
        try:
            task = engine.add_adapter(body.name, body.path, trusted=False)
        except PermissionError as error:
            raise ApiError(403, str(error), param="path") from None
        except AdapterError as error:
            raise ApiError(409, str(error), param="name") from None
        except ConfigError as error:
            raise ApiError(400, str(error), param="path") from None
        try:
            await asyncio.wrap_future(engine.preload(body.name))
        except Exception as error:
            engine.forget(body.name)
            raise ApiError(400, f"adapter {body.name!r} does not load: {error}", param="path") from None
        return JSONResponse(
            {"id": body.name, "object": "model", "parent": engine.base_name, "task": task}, 201
        )

    @app.delete("/v1/adapters/{name}", dependencies=guarded)
    async def unload_adapter(name: str) -> dict:
        served = [*engine.registry.names(), *engine.classifier.names()]
        if name not in served:
            raise ApiError(404, f"no adapter named {name!r}; served: {sorted(served)}", param="name")
        await asyncio.wrap_future(engine.remove_adapter(name))
        return {"id": name, "object": "model", "deleted": True}


async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except ValueError as error:
        raise ApiError(400, f"the body is not valid JSON: {error}", code="json_invalid") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _served(engine: Engine, model: str) -> str:
    if model == engine.base_name or model in engine.registry.names():
        return model
    if model in engine.classifier.names():
        raise ApiError(400, f"{model!r} is a classification adapter: use POST /v1/classify", param="model")
    raise ApiError(
        404,
        f"the model {model!r} does not exist; served: {engine.served_models()}",
        param="model",
        code="model_not_found",
    )


def _param(compute: Callable, param: str):
    """``compute()``; a bad value becomes a 400 naming the field (the error's own ``param`` when it has one)."""
    try:
        return compute()
    except (ValueError, TypeError) as error:
        param = getattr(error, "param", param)
        raise ApiError(400, f"`{param}`: {error}", param=param) from None


async def _answer(engine: Engine, request: Request, body, prompt: tuple, max_tokens, render, rid: str):
    """Submit the request (``prompt``: adapter, token ids, the field they came from); a whole response, or
    server-sent events when ``stream`` is set."""
    adapter, ids, prompt_field = prompt
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    params = SamplingParams(body.temperature, body.top_p, body.seed, body.stop_strings(), body.ignore_eos)

    def emit(event: Event) -> None:  # the scheduler's thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    sequence = _param(
        lambda: engine.sequence(adapter, ids, max_tokens, params, emit, prompt_field, body.stream),
        prompt_field,
    )
    try:
        engine.scheduler.submit(sequence)
    except QueueFull as error:
        raise ApiError(429, f"the server is busy: {error}; retry later") from None
    if body.stream:
        return StreamingResponse(
            _stream(sequence, events, render, body.model, rid), media_type="text/event-stream"
        )
    parts, last = [], Event()
    try:
        while last.finish_reason is None:
            try:
                last = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    sequence.cancel()
                    return Response(status_code=499)
                continue
            parts.append(last.text)
    except asyncio.CancelledError:
        sequence.cancel()
        raise
    _raise_failure(last)
    use = schemas.usage(last.prompt_tokens, last.completion_tokens)
    return render(body.model, "".join(parts), last.finish_reason, use, False, rid)


async def _stream(sequence, events: asyncio.Queue, render, model: str, rid: str) -> AsyncIterator[str]:
    """Server-sent events: one chunk per step that made new text final, the finish reason, ``[DONE]``."""
    try:
        while True:
            event = await events.get()
            if event.error is not None:
                status, message = _failure(event.error)
                yield f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n"
                break
            if event.text or event.finish_reason is not None:
                yield f"data: {json.dumps(render(model, event.text, event.finish_reason, None, True, rid))}\n\n"
            if event.finish_reason is not None:
                break
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the stream ended): the row leaves the batch
        sequence.cancel()


def _failure(error: Exception) -> tuple[int, str]:
    if isinstance(error, AdapterNotFound):
        return 404, str(error)
    if isinstance(error, AdapterError | ConfigError):
        return 400, str(error)
    return 500, f"generation failed: {type(error).__name__}: {error}"


def _raise_failure(event: Event) -> None:
    if event.error is not None:
        status, message = _failure(event.error)
        raise ApiError(status, message, param="model" if status == 404 else None)
