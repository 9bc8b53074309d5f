"""Serve stage: a FastAPI app over a loaded classifier with micro-batching (``newslora serve MODEL``).

One inference thread takes requests from a bounded queue and merges those waiting (up to ``max_batch`` texts,
waiting at most ``batch_wait_ms`` after the first for more) into one ``predict_proba`` call, then answers each
request's future on the event loop; the event loop itself only parses, validates and queues. A full queue is
answered 503 with Retry-After. Input is bounded: body bytes (413), texts per request (413), UTF-8 bytes per text
(413), empty or invalid-Unicode text (422); with ``max_length`` truncation that bounds the tokens per request to
``max_texts * max_length``. ``/metrics`` exposes Prometheus metrics; a bearer token (``NEWSLORA_API_TOKEN``)
guards ``/classify``, ``/labels``, ``/model``, ``/metrics``, ``/docs`` and ``/openapi.json`` when set, and is
required to bind a non-loopback host. ``/`` is a page (``static/page.html``) that classifies pasted headlines
through those routes; it opens without a token and asks for one when the server answers 401.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import queue
import secrets
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from .errors import NewsloraError, first_line
from .serveoptions import TOKEN_ENV, ServeOptions


class ClassifyRequest(BaseModel):
    texts: list[str] = Field(..., min_length=1, description="texts to classify (non-empty UTF-8 strings)")


class Result(BaseModel):
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    results: list[Result]


class QueueFull(Exception):
    pass


class _Job:
    __slots__ = ("texts", "future", "loop")

    def __init__(self, texts, future, loop):
        self.texts, self.future, self.loop = texts, future, loop


def _resolve(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():  # the client went away and the request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class BatchWorker:
    """The one inference thread: bounded queue in, merged ``classify`` calls, results back to the event loop."""

    def __init__(self, classifier, options: ServeOptions, metrics: dict | None = None):
        self.clf, self.opts, self.metrics = classifier, options, metrics or {}
        self.queue: queue.Queue = queue.Queue(maxsize=options.max_queue)
        self.thread = threading.Thread(target=self._run, name="newslora-inference", daemon=True)
        self._stopping = False
        self._lock = threading.Lock()
        self._last_merged = 1  # requests in the previous forward pass

    def start(self) -> None:
        """Start the thread (once; the app's lifespan does, or the first request when run without lifespan)."""
        with self._lock:
            if not self.thread.is_alive() and not self._stopping:
                self.thread.start()

    def submit(self, texts: list[str]) -> asyncio.Future:
        """Queue ``texts``; the future gets their results. Raises :class:`QueueFull` when the queue is full."""
        if self._stopping:
            raise QueueFull
        if not self.thread.is_alive():
            self.start()
        loop = asyncio.get_running_loop()
        job = _Job(texts, loop.create_future(), loop)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job.future

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish every queued job, then end the thread."""
        self._stopping = True
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join(timeout)

    def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None, bool]:
        """Jobs to merge with ``first`` (wait window, max batch), the job that did not fit, and whether to stop."""
        jobs, n = [first], len(first.texts)
        if not self.opts.batching:
            return jobs, None, False
        # wait for more only under concurrency (the last pass merged requests, or more are queued): a lone
        # client is not delayed by the window
        concurrent = self._last_merged > 1 or not self.queue.empty()
        deadline = time.monotonic() + (self.opts.batch_wait_ms / 1000 if concurrent else 0)
        while n < self.opts.max_batch:
            left = deadline - time.monotonic()
            try:
                nxt = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                return jobs, None, True
            if n + len(nxt.texts) > self.opts.max_batch:
                return jobs, nxt, False
            jobs.append(nxt)
            n += len(nxt.texts)
        return jobs, None, False

    def _run(self) -> None:
        carry, stop = None, False
        while not stop or carry is not None:
            job = carry if carry is not None else self.queue.get()
            carry = None
            if job is None:
                break
            jobs, carry, stop = self._collect(job)
            self._last_merged = len(jobs)
            texts = [t for j in jobs for t in j.texts]
            t0 = time.perf_counter()
            try:
                results = self.clf.classify(texts)
                error = None
            except Exception as e:  # answered as a 500 to these requests; the worker keeps serving
                results, error = None, e
            if "batch_texts" in self.metrics:
                self.metrics["batch_texts"].observe(len(texts))
                self.metrics["batch_requests"].observe(len(jobs))
                self.metrics["inference_seconds"].observe(time.perf_counter() - t0)
            i = 0
            for j in jobs:
                part = None if results is None else results[i:i + len(j.texts)]
                i += len(j.texts)
                j.loop.call_soon_threadsafe(_resolve, j.future, part, error)
            del jobs, texts, results, job


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes (by Content-Length, or counted as it streams)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _too_large(self.limit)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, _body_message(self.limit))
            return message

        return await self.app(scope, limited, send)


def _body_message(limit: int) -> str:
    return f"request body is over {limit} bytes: send fewer or shorter texts (server option --max-body-bytes)"


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": _body_message(limit)}, status_code=413)


def _metrics(registry):
    from prometheus_client import Counter, Histogram

    sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    return {
        "batch_texts": Histogram("newslora_batch_texts", "texts per forward pass", buckets=sizes, registry=registry),
        "batch_requests": Histogram("newslora_batch_requests", "requests merged into one forward pass",
                                    buckets=sizes, registry=registry),
        "inference_seconds": Histogram("newslora_inference_seconds", "seconds per forward pass (tokenization "
                                       "included)", registry=registry),
        "rejected": Counter("newslora_rejected_requests", "requests refused, by reason", ["reason"],
                            registry=registry),
    }


def model_facts(model_path: str | Path, label_names: list[str]) -> dict:
    """What ``/model`` (and the page) shows: the model's name, labels, trainable parameters, budget and test
    accuracy, from its run folder (run.json, eval.json) or, for an exported folder, the run its newslora.json names;
    None where a folder does not record it."""
    from .modelfolder import read_meta
    from .run import Run

    path = Path(model_path)
    origin = read_meta(path).get("run")
    run = Run(path / origin if isinstance(origin, str) else path)
    info, ev = run.read_info(), run.read_eval()
    trainable = info.get("trainable") if isinstance(info.get("trainable"), dict) else {}
    return {"name": info.get("name") or path.resolve().name, "labels": list(label_names),
            "method": info.get("method"), "backbone": info.get("backbone"), "trainable": trainable.get("total"),
            "budget": trainable.get("budget"), "test_accuracy": (ev.get("test") or {}).get("accuracy")}


def create_app(model_path: str | Path, classifier=None, options: ServeOptions | None = None,
               runtime: str | None = None, label_names: list[str] | None = None) -> FastAPI:
    """The app: ``POST /classify {"texts": [...]}``, ``GET /labels``, ``GET /model``, ``GET /health``,
    ``GET /metrics``, the page at ``/``, OpenAPI docs at ``/docs``. The inference worker starts and stops with the
    app's lifespan. ``label_names``: a plain PEFT adapter's classes (see :func:`newslora.modelfolder.describe`)."""
    from prometheus_client import CollectorRegistry, Gauge
    from prometheus_fastapi_instrumentator import Instrumentator

    from .predict import check_text, load_classifier

    opts = options or ServeOptions()
    opts.check()
    clf = classifier or load_classifier(model_path, runtime=runtime, label_names=label_names)
    registry = CollectorRegistry()  # per app: several apps in one process (tests) do not collide
    metrics = _metrics(registry)
    worker = BatchWorker(clf, opts, metrics)
    Gauge("newslora_queue_depth", "requests waiting for the inference worker", registry=registry) \
        .set_function(worker.queue.qsize)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:  # uvicorn has answered the in-flight requests by now; finish anything still queued
            await asyncio.to_thread(worker.stop)

    hidden = {"openapi_url": None, "docs_url": None, "redoc_url": None} if opts.token else {}
    app = FastAPI(title="newslora", version="1", lifespan=lifespan, **hidden,
                  description=f"News topic classifier ({clf.runtime} runtime). Micro-batched: "
                              f"up to {opts.max_batch} texts per forward pass; at most {opts.max_texts} texts of "
                              f"{opts.max_text_bytes} UTF-8 bytes per request.")
    app.state.worker, app.state.options = worker, opts
    app.add_middleware(BodyLimit, limit=opts.max_body_bytes)
    bearer = HTTPBearer(auto_error=False, description=f"the token in ${TOKEN_ENV} on the server")

    def authorized(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if opts.token is None:
            return
        if creds is None or not secrets.compare_digest(creds.credentials.encode(), opts.token.encode()):
            metrics["rejected"].labels("unauthorized").inc()
            raise HTTPException(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # the offending input is not echoed back: it may be huge or not encodable (a lone surrogate)
        errors = [{k: v for k, v in e.items() if k not in ("input", "ctx", "url")} for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    Instrumentator(excluded_handlers=["/metrics"], registry=registry).instrument(app)

    @app.get("/metrics", include_in_schema=True, dependencies=[Depends(authorized)])
    def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if opts.token:  # the API's description is for those who hold the token
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorized)])
        def openapi():
            return app.openapi()

        @app.get("/docs", include_in_schema=False, dependencies=[Depends(authorized)])
        def docs():
            from fastapi.openapi.docs import get_swagger_ui_html

            return get_swagger_ui_html(openapi_url="/openapi.json", title="newslora")

    @app.get("/health")  # open to probes without the token, so it tells nothing about the model or its files
    def health():
        return {"status": "ok", "runtime": clf.runtime, "queue": worker.queue.qsize(), "max_queue": opts.max_queue}

    facts = model_facts(model_path, clf.label_names)
    page = resources.files(__package__).joinpath("static", "page.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    def index():  # no token: a browser opening the page cannot send one; the page asks for it
        return HTMLResponse(page)

    @app.get("/model", dependencies=[Depends(authorized)])
    def model():
        return facts

    @app.get("/labels", dependencies=[Depends(authorized)])
    def labels():
        return {"labels": clf.label_names}

    @app.post("/classify", response_model=ClassifyResponse, dependencies=[Depends(authorized)],
              responses={413: {"description": "too many texts, a text or the body too large"},
                         422: {"description": "empty or invalid text"},
                         503: {"description": "queue full: retry after Retry-After seconds"}})
    async def classify(req: ClassifyRequest):
        if len(req.texts) > opts.max_texts:
            metrics["rejected"].labels("too_many_texts").inc()
            raise HTTPException(413, f"{len(req.texts)} texts in one request; the limit is {opts.max_texts} "
                                     "(split the request, or raise --max-texts)")
        for i, t in enumerate(req.texts):
            try:
                check_text(t, f"texts[{i}]")
            except NewsloraError as e:
                metrics["rejected"].labels("invalid_text").inc()
                raise HTTPException(422, str(e)) from None
            if len(t) * 4 > opts.max_text_bytes and len(t.encode("utf-8")) > opts.max_text_bytes:
                metrics["rejected"].labels("text_too_long").inc()
                kept = {"head": "first", "tail": "last", "head_tail": "first and last"}.get(clf.truncation, "first")
                raise HTTPException(413, f"texts[{i}] is over {opts.max_text_bytes} UTF-8 bytes; the model reads "
                                         f"only its {kept} {clf.max_length} tokens: shorten it (or raise "
                                         "--max-text-bytes)")
        try:
            future = worker.submit(req.texts)
        except QueueFull:
            metrics["rejected"].labels("queue_full").inc()
            raise HTTPException(503, f"server busy: {opts.max_queue} requests already queued; retry later",
                                headers={"Retry-After": str(opts.retry_after_s)}) from None
        try:
            return {"results": await future}
        except Exception as e:
            raise HTTPException(500, f"inference failed: {first_line(e, with_type=True)}") from None

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


READ_TIMEOUT_S = 10.0  # a request's headers and body must arrive within this after its first byte


def read_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol with a read deadline: a request whose headers and body have not all arrived
    ``seconds`` after its first byte (a slow-drip client) has its connection closed, instead of holding it open
    for as long as the client trickles bytes. Idle keep-alive connections keep uvicorn's own timeout."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeout(H11Protocol):
        deadline = None

        def data_received(self, data: bytes) -> None:
            if self.deadline is None and (self.cycle is None or self.cycle.response_complete):  # a new request
                self.deadline = self.loop.call_later(seconds, self.transport.close)
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete and not self.cycle.more_body:
                self._disarm()  # the whole request is in

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

    return ReadTimeout


def server_config(app, host: str = "127.0.0.1", port: int = 8000, graceful_timeout: float = 30.0,
                  read_timeout: float = READ_TIMEOUT_S, log_level: str = "info"):
    """uvicorn's settings for the app: read deadline per request, 5 s idle keep-alive, graceful shutdown (stop
    accepting, answer in-flight requests with ``Connection: close``, close idle connections)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=graceful_timeout, access_log=False,
                          log_level=log_level, timeout_keep_alive=5, http=read_timeout_protocol(read_timeout))


def listen(host: str, port: int):
    """The server's listening socket, bound before the model loads: a wrong or busy port is said at once."""
    import socket

    if not 0 <= port <= 65535:
        raise NewsloraError(f"--port {port}: a TCP port is 0..65535; choose e.g. --port 8000")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise NewsloraError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host, "
                            "or stop what uses it") from None
    return sock


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, runtime: str | None = None,
          options: ServeOptions | None = None, graceful_timeout: float = 30.0,
          label_names: list[str] | None = None) -> None:
    """Run the app under uvicorn. A non-loopback ``host`` needs a token in ``$NEWSLORA_API_TOKEN``; on SIGINT or
    SIGTERM uvicorn stops accepting, finishes in-flight requests (up to ``graceful_timeout`` s), then the worker
    drains its queue."""
    import uvicorn

    opts = options or ServeOptions()
    opts.token = opts.token or os.environ.get(TOKEN_ENV) or None
    if opts.token is None and not is_loopback(host):
        raise NewsloraError(f"serving on {host} (not loopback) needs a bearer token: set {TOKEN_ENV} "
                            "(clients send 'Authorization: Bearer <token>'), or keep --host 127.0.0.1")
    sock = listen(host, port)
    try:
        app = create_app(model_path, options=opts, runtime=runtime, label_names=label_names)
        uvicorn.Server(server_config(app, host, port, graceful_timeout)).run(sockets=[sock])
    finally:
        sock.close()
