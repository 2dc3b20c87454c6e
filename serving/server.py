"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.config import EngineConfig
from serving.engine import Engine
from serving.metrics import EngineMetrics
from serving.protocol import ChatCompletionRequest, CompletionRequest
from serving.request import RequestOutput, SpecStats
from serving.sampling import InvalidRequest

logger = logging.getLogger(__name__)


def error_body(message: str, param: str | None = None, err_type="invalid_request_error", code=None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def _bad(message: str, param: str | None = None, status=400, code=None) -> JSONResponse:
    return JSONResponse(error_body(message, param, code=code), status_code=status)


def _load_template(template: str | None) -> str | None:
    if template and Path(template).is_file():
        return Path(template).read_text()
    return template


class _ApiKeyCheck:
    """Bearer-token check on the /v1 routes, as plain ASGI middleware: Starlette's `@app.middleware("http")` wraps
    `receive` so that `Request.is_disconnected()` never turns true, and a non-streaming request would then run to
    its end after its client had gone."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
            if given != self.expected:
                body = error_body("invalid API key", None, "authentication_error", "invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Generation:
    """Requests of one HTTP call (n choices x prompts), their outputs bridged from the engine thread."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params, stream: bool = True):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.n = params.n
        self.prompts = prompts
        self.reqs = []
        for prompt in prompts:  # all validated before any is submitted
            engine.check_prompt(prompt, params)
        for p_idx, prompt in enumerate(prompts):
            for j in range(params.n):
                child = _child_params(params, j)
                index = p_idx * params.n + j
                self.reqs.append(engine.submit(prompt, child, self._callback(index), stream=stream))
        self.finished: dict[int, RequestOutput] = {}

    def _callback(self, index):
        def put(out: RequestOutput):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

        return put

    async def events(self):
        while len(self.finished) < len(self.reqs):
            index, out = await self.queue.get()
            if out.finished:
                self.finished[index] = out
            yield index, out

    def abort(self) -> None:
        for req in self.reqs:
            if not req.finished:
                self.engine.abort(req.rid)

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(o.completion_tokens for o in self.finished.values())
        cached = sum(
            self.finished[i * self.n].cached_tokens for i in range(len(self.prompts)) if i * self.n in self.finished
        )
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def error(self) -> str | None:
        return next((o.error for o in self.finished.values() if o.error), None)

    def envelope(self, rid: str, obj: str, model: str, choices: list, created: int | None = None) -> dict:
        """Response or final chunk: choices plus usage and, when speculating, the spec_decoding figures."""
        resp = {
            "id": rid,
            "object": obj,
            "created": created or int(time.time()),
            "model": model,
            "choices": choices,
            "usage": self.usage(),
        }
        spec = self.spec_decoding()
        if spec is not None:
            resp["spec_decoding"] = spec
        return resp

    def spec_decoding(self) -> dict | None:
        stats = [o.spec for o in self.finished.values() if o.spec is not None]
        if not stats:
            return None
        total = SpecStats(
            num_verify_steps=sum(s.num_verify_steps for s in stats),
            num_draft_tokens=sum(s.num_draft_tokens for s in stats),
            num_accepted_tokens=sum(s.num_accepted_tokens for s in stats),
        )
        return total.as_dict()


def _child_params(params, j):
    import dataclasses

    child = dataclasses.replace(params, n=1)
    if params.seed is not None:
        child.seed = params.seed + j
    return child


def create_app(engine: Engine, chat_template: str | None = None, api_key: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="specrail", version="0.1.0", lifespan=lifespan)
    metrics = engine.metrics or EngineMetrics(engine.model_name)
    engine.metrics = metrics
    template = _load_template(chat_template)
    tokenizer = engine.tokenizer

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        if err.get("type") == "json_invalid":
            return _bad("the request body is not valid JSON", None)
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return _bad(f"invalid field '{param}': {err.get('msg', 'invalid value')}", param)

    @app.exception_handler(InvalidRequest)
    async def _invalid(_request, exc: InvalidRequest):
        return _bad(str(exc), exc.param)

    if api_key:
        app.add_middleware(_ApiKeyCheck, api_key=api_key)

    @app.get("/health")
    async def health():
        alive = engine._thread is not None and engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "down"}, status_code=200 if alive else 503)

    @app.post("/flush_cache")
    async def flush_cache():
        flushed = await asyncio.get_running_loop().run_in_executor(None, engine.flush_cache)
        if not flushed:
            return _bad("requests are in flight; the prefix cache was not flushed", None, status=409)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        metrics.observe_engine(engine)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": engine.model_name,
                    "object": "model",
                    "created": int(metrics.started),
                    "owned_by": "specrail",
                    "max_model_len": engine.context_length,
                }
            ],
        }

    def check_model(name: str):
        if name != engine.model_name:
            raise InvalidRequest(
                f"the model '{name}' does not exist; this server serves '{engine.model_name}'", "model"
            )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = _completion_prompts(body.prompt, tokenizer)
        params = body.sampling_params(default_max_tokens=16)
        gen = _Generation(engine, prompts, params, stream=bool(body.stream))
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return StreamingResponse(
                _stream_completion(gen, rid, body, engine.model_name), media_type="text/event-stream"
            )
        texts = await _collect(gen, request)
        if texts is None:
            return Response(status_code=499)
        if gen.error():
            return JSONResponse(error_body(gen.error(), None, "server_error"), status_code=500)
        choices = []
        for i, text in sorted(texts.items()):
            prefix = tokenizer.decode(prompts[i // gen.n]) if body.echo else ""
            choices.append(
                {"index": i, "text": prefix + text, "logprobs": None, "finish_reason": gen.finished[i].finish_reason}
            )
        return gen.envelope(rid, "text_completion", engine.model_name, choices)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        kwargs = dict(body.chat_template_kwargs or {})
        try:
            text = tokenizer.apply_chat_template(
                messages,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=body.add_generation_prompt,
                **kwargs,
            )
        except Exception as e:  # jinja errors from a template that rejects this conversation
            raise InvalidRequest(f"the chat template cannot render these messages: {e}", "messages") from e
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        body.max_tokens = max_tokens
        params = body.sampling_params(default_max_tokens=max(1, engine.context_length - len(prompt)))
        gen = _Generation(engine, [prompt], params, stream=bool(body.stream))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return StreamingResponse(_stream_chat(gen, rid, engine.model_name), media_type="text/event-stream")
        texts = await _collect(gen, request)
        if texts is None:
            return Response(status_code=499)
        if gen.error():
            return JSONResponse(error_body(gen.error(), None, "server_error"), status_code=500)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": gen.finished[i].finish_reason,
            }
            for i, text in sorted(texts.items())
        ]
        return gen.envelope(rid, "chat.completion", engine.model_name, choices)

    return app


def _completion_prompts(prompt, tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer(prompt)["input_ids"]]
    if not prompt:
        raise InvalidRequest("the prompt is empty", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], str):
        if len(prompt) > 64:
            raise InvalidRequest("at most 64 prompts per request", "prompt")
        return [tokenizer(p)["input_ids"] for p in prompt]
    if len(prompt) > 64:
        raise InvalidRequest("at most 64 prompts per request", "prompt")
    return [list(p) for p in prompt]


async def _collect(gen: _Generation, request: Request) -> dict[int, str] | None:
    """Wait for all choices; abort them (and return None) if the client goes away."""
    texts: dict[int, str] = {}

    async def consume():
        async for index, out in gen.events():
            texts[index] = texts.get(index, "") + out.text_delta

    task = asyncio.ensure_future(consume())
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await request.is_disconnected():
                task.cancel()
                gen.abort()
                return None
        task.result()
        return texts
    except asyncio.CancelledError:
        gen.abort()
        raise


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream_completion(gen: _Generation, rid: str, body: CompletionRequest, model: str):
    created = int(time.time())
    try:
        async for index, out in gen.events():
            if out.error:
                yield _sse(error_body(out.error, None, "server_error"))
                continue
            if out.text_delta or out.finished:
                yield _sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [
                            {
                                "index": index,
                                "text": out.text_delta,
                                "logprobs": None,
                                "finish_reason": out.finish_reason if out.finished else None,
                            }
                        ],
                    }
                )
        yield _sse(gen.envelope(rid, "text_completion", model, [], created))
        yield "data: [DONE]\n\n"
    finally:
        gen.abort()


async def _stream_chat(gen: _Generation, rid: str, model: str):
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    try:
        for i in range(len(gen.reqs)):
            yield _sse(
                {
                    **base,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        async for index, out in gen.events():
            if out.error:
                yield _sse(error_body(out.error, None, "server_error"))
                continue
            if out.text_delta:
                yield _sse(
                    {
                        **base,
                        "choices": [
                            {
                                "index": index,
                                "delta": {"content": out.text_delta},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            if out.finished:
                yield _sse(
                    {
                        **base,
                        "choices": [
                            {"index": index, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}
                        ],
                    }
                )
        yield _sse(gen.envelope(rid, "chat.completion.chunk", model, [], created))
        yield "data: [DONE]\n\n"
    finally:
        gen.abort()


def server_config(app, host: str, port: int, log_level: str, timeout_graceful_shutdown: float):
    """uvicorn settings: on SIGINT/SIGTERM, open requests (long streams included) get timeout_graceful_shutdown
    seconds to finish; then their tasks are cancelled, which aborts their generations, and the engine stops."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=timeout_graceful_shutdown,
    )


def serve(
    engine: Engine, host: str, port: int, chat_template=None, api_key=None, log_level="info",
    timeout_graceful_shutdown: float = EngineConfig.timeout_graceful_shutdown,
) -> None:  # fmt: skip
    import uvicorn

    app = create_app(engine, chat_template, api_key)
    uvicorn.Server(server_config(app, host, port, log_level, timeout_graceful_shutdown)).run()
