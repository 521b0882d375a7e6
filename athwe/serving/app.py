"""Serve a trained run over HTTP: FastAPI endpoints over a Retriever, with request batching.

    athwe serve --run runs/<id> [--port 8000]

Endpoints: ``POST /recommend`` (a known user, or any history of item tokens with optional
timestamps), ``POST /items`` (new items from their content), ``GET /items/{token}``,
``GET /health``, ``GET /info``; OpenAPI docs at ``/docs``.

The model runs on one worker thread, so it is never used by two threads at once. Concurrent
``/recommend`` requests are gathered by one asyncio task into batches (at most ``max_batch``
requests, waiting at most ``max_wait_ms`` after the first) that take one model pass and one index
search; ``/items`` and lookups queue on the same thread. Every error is a JSON body
``{"error": "<one line>"}``: 400/422 for a bad request, 404 for an unknown user or item, 413 for
a body over ``max_body_bytes``, 500 for anything unexpected (logged; the server keeps serving).
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Awaitable, Callable, Iterator

from fastapi import FastAPI, HTTPException
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import (BaseModel, ConfigDict, Field, FiniteFloat, StringConstraints, field_validator,
                      model_validator)
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from athwe.errors import AthweError, UnknownTokenError, brief
from athwe.retrieval.index import Request, Retriever

logger = logging.getLogger("athwe.serving")

MAX_K = 1000
MAX_HISTORY = 1000
MAX_EXCLUDE = 1000
MAX_NEW_ITEMS = 1000
#: seconds uvicorn waits for requests in flight after SIGINT/SIGTERM before closing connections
GRACEFUL_SHUTDOWN_S = 10.0
#: AthweError messages that mean "no such user/item" (answered 404, every other one 400)

Token = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Text = Annotated[str, StringConstraints(max_length=100_000)]


# -- request and response bodies (the OpenAPI schema at /docs) -------------------------------------
class RecommendBody(BaseModel):
    """A known user, or a history of item tokens (oldest first) with optional timestamps."""
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True,
                              json_schema_extra={"examples": [{"user": "42", "k": 10},
                                                              {"items": ["7", "19", "3"], "k": 5}]})

    user: Token | None = Field(None, description="a user token of the run's dataset")
    items: list[Token] | None = Field(None, min_length=1, max_length=MAX_HISTORY,
                                      description="a history of item tokens, oldest first")
    timestamps: list[FiniteFloat] | None = Field(None, max_length=MAX_HISTORY,
                                                 description="unix seconds, one per history item")
    k: int = Field(10, ge=1, le=MAX_K, strict=True, description="how many items")
    exclude: list[Token] = Field(default_factory=list, max_length=MAX_EXCLUDE,
                                 description="item tokens never to recommend")
    exclude_history: bool = Field(True, strict=True, description="drop items the history already holds")

    @model_validator(mode="after")
    def _one_history(self) -> RecommendBody:
        if (self.user is None) == (self.items is None):
            raise ValueError("pass exactly one of `user` (a known user) or `items` (a history of item tokens)")
        if self.timestamps is not None and self.items is None:
            raise ValueError("`timestamps` go with `items` (a known user's come from the dataset)")
        if self.timestamps is not None and len(self.timestamps) != len(self.items):
            raise ValueError(f"`timestamps` needs one value per history item "
                             f"({len(self.timestamps)} timestamps, {len(self.items)} items)")
        return self


class RecommendationOut(BaseModel):
    rank: int
    item_id: int
    item: str
    title: str | None
    score: float


class RecommendResponse(BaseModel):
    recommendations: list[RecommendationOut]


class ItemRecord(BaseModel):
    """A new item's content, as in `athwe items add` JSON lines; other string fields name columns of
    the dataset's .item file."""
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)
    __pydantic_extra__: dict[str, Text]

    item: Token
    title: Text | None = None
    categories: list[Text] | Text | None = Field(None, description="one category path, top level first, "
                                                                    "or 'Top > Sub > Leaf'")
    brand: Text | None = None
    description: Text | None = None
    image: Text | None = Field(None, description="an http(s) URL (the server reads no local files for clients)")

    @field_validator("image")
    @classmethod
    def _url_only(cls, value: str | None) -> str | None:
        if value and not value.lower().startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL (the server reads no local files for clients)")
        return value


class NewItems(BaseModel):
    """`{"items": [...]}`, or the bare list of records."""
    model_config = ConfigDict(extra="forbid")

    items: list[ItemRecord] = Field(min_length=1, max_length=MAX_NEW_ITEMS)

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, value: Any) -> Any:
        return {"items": value} if isinstance(value, list) else value


class AddedItems(BaseModel):
    added: list[str]


class ErrorBody(BaseModel):
    error: str


# -- batching --------------------------------------------------------------------------------------
#: beyond these a setting is a typo: a batch that large would not fit, a wait that long looks like a hang
MAX_BATCH = 4096
MAX_WAIT_MS = 1000.0


def check_settings(max_batch: int, max_wait_ms: float, max_body_bytes: int = 1, threads: int | None = None) -> None:
    """One-line errors, named as the command-line options, for the serving settings."""
    if not 1 <= max_batch <= MAX_BATCH:
        raise AthweError(f"--max-batch must be between 1 and {MAX_BATCH:,}, got {max_batch}")
    if not 0 <= max_wait_ms <= MAX_WAIT_MS:
        raise AthweError(f"--max-wait-ms must be between 0 and {MAX_WAIT_MS:g}, got {max_wait_ms:g}")
    if max_body_bytes < 1:
        raise AthweError(f"--max-body-bytes must be at least 1, got {max_body_bytes}")
    if threads is not None and threads < 1:
        raise AthweError(f"--threads must be at least 1, got {threads}")


@dataclass
class _Pending:
    request: Request
    future: asyncio.Future
    queued: float  # loop time


class Batcher:
    """Runs the retriever on one worker thread and gathers concurrent recommendation requests
    into batches for it (or, with batching=False, runs each alone). `threads`: the torch and FAISS
    threads of the worker (FAISS's OpenMP setting is per thread, so it is made there)."""

    def __init__(self, retriever: Any, max_batch: int = 32, max_wait_ms: float = 2.0, batching: bool = True,
                 threads: int | None = None):
        check_settings(max_batch, max_wait_ms)
        self.retriever = retriever
        self.max_batch, self.max_wait, self.batching = max_batch, max_wait_ms / 1000.0, batching
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="athwe-model",
                                         initializer=None if threads is None else set_threads, initargs=(threads,))
        self.queue: asyncio.Queue[_Pending] | None = None
        self.task: asyncio.Task | None = None
        self.inflight: list[_Pending] = []  # the batch on the worker now
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "batched_requests": 0, "fallbacks": 0}

    def status(self) -> dict[str, Any]:
        """The settings and counters (/info's "serving")."""
        return {"batching": self.batching, "max_batch": self.max_batch, "max_wait_ms": self.max_wait * 1000.0,
                **self.stats}

    async def start(self) -> None:
        if self.batching:
            self.queue = asyncio.Queue()
            self.task = asyncio.create_task(self._consume(), name="athwe-batcher")

    async def stop(self) -> None:
        """Stop the consumer; requests still waiting (queued, or in a batch cut short) get a 503."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        waiting = list(self.inflight)
        while self.queue is not None and not self.queue.empty():
            waiting.append(self.queue.get_nowait())
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(HTTPException(503, "the server is shutting down"))
        self.inflight = []

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the worker thread (serialised with the batches)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def recommend(self, request: Request) -> list[Any]:
        self.stats["requests"] += 1
        if self.task is None or self.task.done():  # batching off, or no lifespan ran: alone
            self._count([request])
            result = (await self.call(self._run, [request]))[0]
        else:
            loop = asyncio.get_running_loop()
            pending = _Pending(request, loop.create_future(), loop.time())
            self.queue.put_nowait(pending)
            result = await pending.future
        if isinstance(result, BaseException):
            raise result
        return result

    async def _consume(self) -> None:
        """Forever: take the first waiting request, add what arrives until max_batch requests or
        max_wait after that first one was queued, run them as one batch, hand out the results."""
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = batch[0].queued + self.max_wait
            while len(batch) < self.max_batch:
                if self.queue.empty():
                    wait = deadline - loop.time()
                    if wait <= 0:
                        break
                    try:  # a get cut short by the timeout leaves its item in the queue
                        batch.append(await asyncio.wait_for(self.queue.get(), wait))
                    except asyncio.TimeoutError:
                        break
                else:
                    batch.append(self.queue.get_nowait())
            self.inflight = [p for p in batch if not p.future.done()]  # e.g. cancelled: its client left
            if not self.inflight:
                continue
            self._count([p.request for p in self.inflight])
            try:
                results = await self.call(self._run, [p.request for p in self.inflight])
            except Exception as e:  # noqa: BLE001 - the worker itself failed; never leave a request waiting
                results = [e] * len(self.inflight)
            for p, result in zip(self.inflight, results):
                if not p.future.done():
                    p.future.set_result(result)
            self.inflight = []

    def _count(self, requests: list[Request]) -> None:
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(requests))
        if len(requests) > 1:
            self.stats["batched_requests"] += len(requests)

    def _run(self, requests: list[Request]) -> list[Any]:
        """On the worker thread: one recommend_batch for all; when it fails, each request alone, so
        one bad request does not fail the others. Each result is a list of Recommendations or the
        exception its request raised."""
        try:
            out = list(self.retriever.recommend_batch(requests))
            if len(out) != len(requests):  # every waiting request must get its own answer
                raise RuntimeError(f"recommend_batch gave {len(out)} answers for {len(requests)} requests")
            return out
        except Exception as e:  # noqa: BLE001 - handed to the request(s) that caused it
            if len(requests) == 1:
                return [e]
        self.stats["fallbacks"] += 1
        out: list[Any] = []
        for r in requests:
            try:
                out.append(self.retriever.recommend_batch([r])[0])
            except Exception as e:  # noqa: BLE001 - this request's answer
                out.append(e)
        return out


# -- errors ----------------------------------------------------------------------------------------
def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _field(loc: tuple) -> str:
    """("body", "items", 3) -> "items[3]"; the body itself -> "request body"."""
    parts = [p for p in loc if p not in ("body", "path", "query", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "request body"


def validation_error(exc: RequestValidationError) -> tuple[int, str]:
    """Status and one line naming the field, for the first of a request's validation errors."""
    errors = exc.errors()
    if not errors:
        return 422, "invalid request"
    first = errors[0]
    if first["type"] == "json_invalid":
        pos = first["loc"][-1] if first["loc"] else "?"
        return 400, f"malformed JSON body: {first.get('ctx', {}).get('error', 'decode error')} at character {pos}"
    field, msg = _field(tuple(first["loc"])), first["msg"]
    if field == "request body" and first["type"] == "missing":
        msg = "a JSON body is required"
    elif field == "request body" and isinstance(first.get("input"), bytes):
        msg = "must be JSON (Content-Type: application/json)"
    elif first["type"] == "extra_forbidden":
        msg = "unknown field"
    msg = msg.removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return 422, one_line(f"{field}: {msg}{more}")


def athwe_error_status(e: AthweError) -> int:
    return 404 if isinstance(e, UnknownTokenError) else 400


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status)


class BodyLimit:
    """413 for a request body over `max_bytes`: at once when its Content-Length says so, else as soon
    as the bytes read pass it (a chunked body), so a huge body is never held in memory."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(413, _too_large(self.max_bytes))(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, _too_large(self.max_bytes))  # FastAPI passes it to the handler
            return message

        await self.app(scope, limited, send)


def _too_large(max_bytes: int) -> str:
    return f"request body is larger than {max_bytes:,} bytes"


async def _answer(call: Awaitable[Any]) -> Any:
    """Await a call into the retriever; an exception it did not mean for the client (not an
    AthweError) becomes a one-line 500 for this request alone, its traceback in the log."""
    try:
        return await call
    except (AthweError, HTTPException):
        raise
    except Exception as e:  # noqa: BLE001 - any other failure is this request's, not the server's
        logger.error("unexpected error while serving a request", exc_info=e)
        raise HTTPException(500, f"internal error: {type(e).__name__}: {brief(e)}") from None


# -- the app ---------------------------------------------------------------------------------------
def create_app(retriever: Any, max_batch: int = 32, max_wait_ms: float = 2.0, max_body_bytes: int = 1_000_000,
               batching: bool = True, threads: int | None = None) -> FastAPI:
    """The HTTP app over a loaded Retriever (or anything with its methods); `threads`: torch/FAISS
    threads of the model thread (default: the libraries')."""
    check_settings(max_batch, max_wait_ms, max_body_bytes, threads)
    batcher = Batcher(retriever, max_batch, max_wait_ms, batching, threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="athwe", summary="Sequential recommendations from a trained athwe run.",
                  lifespan=lifespan,
                  responses={400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 413: {"model": ErrorBody},
                             422: {"model": ErrorBody}, 500: {"model": ErrorBody}})
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.batcher = batcher
    app.state.retriever = retriever

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        return _error(*validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(AthweError)
    async def _athwe(request: HTTPRequest, exc: AthweError) -> JSONResponse:
        return _error(athwe_error_status(exc), str(exc))

    @app.exception_handler(Exception)
    async def _internal(request: HTTPRequest, exc: Exception) -> JSONResponse:  # a bug in this module
        return _error(500, f"internal error: {type(exc).__name__}: {brief(exc)}")

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(body: RecommendBody) -> Response:
        """Top-k items for a known user or for any history (batched with concurrent requests)."""
        request = Request(user=body.user, items=body.items, timestamps=body.timestamps, k=body.k,
                          exclude=tuple(body.exclude), exclude_history=body.exclude_history)
        recs = await _answer(batcher.recommend(request))
        # serialised here: the answer is built from the retriever's own typed records, so FastAPI's
        # validation of it against the response model (which still documents it) only costs time
        return Response(json.dumps({"recommendations": [asdict(r) for r in recs]}, separators=(",", ":")),
                        media_type="application/json")

    @app.post("/items", response_model=AddedItems)
    async def add_items(body: NewItems) -> dict[str, Any]:
        """Add new items from their content (a list of records, or {"items": [...]})."""
        records = [r.model_dump(exclude_none=True) for r in body.items]
        return {"added": list(await _answer(batcher.call(retriever.add_items, records)))}

    @app.get("/items/{token:path}")
    async def item(token: str) -> dict[str, Any]:
        """One item of the catalogue: its id, token and content."""
        return await _answer(batcher.call(retriever.item, token))

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: answers without touching the model."""
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        """The run, model and index being served, and the batching counters."""
        return {**(await _answer(batcher.call(retriever.info))), "serving": batcher.status()}

    return app


# -- running it ------------------------------------------------------------------------------------
@contextmanager
def _stop_signals_end_quietly(server: Any) -> Iterator[None]:
    """uvicorn re-raises the SIGINT/SIGTERM it stopped on once its graceful shutdown is done; with
    these handlers under its own, that ends serve() normally instead of a KeyboardInterrupt or a
    kill. One arriving before uvicorn installs its own still stops the server."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(sig: int, frame: Any) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def set_threads(threads: int) -> None:
    """Torch threads of this process and FAISS threads of the calling thread (e.g. 1 when a load
    generator shares the CPUs)."""
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32,
          max_wait_ms: float = 2.0, batching: bool = True, log_level: str = "info",
          max_body_bytes: int = 1_000_000, threads: int | None = None) -> None:
    """Load a run once and serve it over HTTP until SIGINT or SIGTERM (then finish the requests in
    flight and return)."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise AthweError(f"--port must be between 0 and 65535, got {port}")
    check_settings(max_batch, max_wait_ms, max_body_bytes, threads)
    if threads is not None:
        set_threads(threads)  # for loading the run here; the model thread sets its own
    retriever = Retriever(run_dir)
    app = create_app(retriever, max_batch, max_wait_ms, max_body_bytes, batching, threads)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)
    with _stop_signals_end_quietly(server):
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind, after logging why
            raise AthweError(f"cannot serve on {host}:{port} (see the error above)") from None
