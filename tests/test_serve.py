"""``newslora serve``: a real uvicorn server on 127.0.0.1 (free port, in a thread), real httpx clients."""
from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from newslora.errors import NewsloraError
from newslora.predict import load_classifier
from newslora.serve import READ_TIMEOUT_S, ServeOptions, create_app, listen, serve, server_config

TEXTS = ["Stocks fall as oil climbs", "United win the derby", "NASA probe reaches Titan", "Rates held steady",
         "Chipmaker unveils faster laptop processor", "Ceasefire talks resume in Geneva", "Oil", "Cup final tonight"]


@pytest.fixture(scope="module")
def clf(tiny_model_dir):
    return load_classifier(tiny_model_dir)


@contextmanager
def running(app, graceful_timeout: float = 10, read_timeout: float = READ_TIMEOUT_S):
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread, with ``newslora serve``'s settings; stop
    it (graceful shutdown) on exit."""
    import uvicorn

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app, graceful_timeout=graceful_timeout, read_timeout=read_timeout,
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


class Gated:
    """The real classifier, held at a gate before each batch: lets a test keep the inference worker busy."""

    def __init__(self, clf):
        self.clf, self.gate, self.entered = clf, threading.Event(), threading.Event()
        self.label_names, self.runtime, self.max_length = clf.label_names, clf.runtime, clf.max_length

    def classify(self, texts):
        self.entered.set()
        assert self.gate.wait(30), "test never opened the gate"
        return self.clf.classify(texts)


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:{{(.*)}})? (\S+)", line)
        if m and all(part in (m.group(1) or "") for part in want.split(",") if part):
            return float(m.group(2))
    return 0.0


def test_concurrent_clients_match_classify(tiny_model_dir, clf):
    app = create_app(tiny_model_dir, classifier=clf, options=ServeOptions(batch_wait_ms=30, max_batch=64))
    requests = [[TEXTS[i % len(TEXTS)], TEXTS[(i * 3) % len(TEXTS)]][: 1 + i % 2] for i in range(48)]

    async def fire(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/classify", json={"texts": t}) for t in requests))

    with running(app) as (url, _):
        responses = asyncio.run(fire(url))
        metrics = httpx.get(f"{url}/metrics").text
        health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["runtime"] == "torch"
    for texts, r in zip(requests, responses):
        assert r.status_code == 200, r.text
        got, want = r.json()["results"], clf.classify(texts)
        assert [g["label"] for g in got] == [w["label"] for w in want]
        for g, w in zip(got, want):
            assert g["scores"] == pytest.approx(w["scores"], abs=1e-5)
    assert metric(metrics, "http_requests_total", handler="/classify", status="2xx") == 48
    n_batches = metric(metrics, "newslora_batch_requests_count")
    assert metric(metrics, "newslora_batch_requests_sum") == 48
    assert 1 <= n_batches < 48  # concurrent requests were merged into fewer forward passes
    assert metric(metrics, "newslora_batch_texts_sum") == sum(map(len, requests))


def test_no_batching_is_one_forward_per_request(tiny_model_dir, clf):
    app = create_app(tiny_model_dir, classifier=clf, options=ServeOptions(batching=False))

    async def fire(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/classify", json={"texts": [t]}) for t in TEXTS))

    with running(app) as (url, _):
        assert all(r.status_code == 200 for r in asyncio.run(fire(url)))
        metrics = httpx.get(f"{url}/metrics").text
    assert metric(metrics, "newslora_batch_requests_count") == len(TEXTS)


def test_merged_batch_is_padded_to_its_longest_text(tiny_model_dir):
    """Requests queued while the worker is busy go into one forward pass, padded to the longest of their texts
    (not to max_length): padding is work the model does for nothing."""
    clf = load_classifier(tiny_model_dir)  # its own instance: the hook below must not outlive this test
    shapes = []
    clf.model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                        with_kwargs=True)
    gated = Gated(clf)
    app = create_app(tiny_model_dir, classifier=gated, options=ServeOptions(max_batch=64, batch_wait_ms=0))
    merged = [["Oil"], ["Cup final tonight", "Rates held steady"], ["Chipmaker unveils faster laptop processor"]]
    tokens = [len(clf.tokenizer(t, truncation=True, max_length=clf.max_length)["input_ids"])
              for texts in merged for t in texts]

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            deadline = time.monotonic() + 60
            first = asyncio.create_task(c.post("/classify", json={"texts": ["held at the gate"]}))
            while not gated.entered.is_set():
                assert time.monotonic() < deadline, "the first request never reached the model"
                await asyncio.sleep(0.01)
            rest = [asyncio.create_task(c.post("/classify", json={"texts": t})) for t in merged]
            while app.state.worker.queue.qsize() < len(merged):
                assert time.monotonic() < deadline, "the other requests were never queued"
                await asyncio.sleep(0.01)
            gated.gate.set()
            return [await first] + [await r for r in rest]

    with running(app) as (url, _):
        responses = asyncio.run(scenario(url))
    assert all(r.status_code == 200 for r in responses)
    assert [len(r.json()["results"]) for r in responses[1:]] == [len(t) for t in merged]
    assert len(shapes) == 2  # the gated request, then the three queued ones in one forward pass
    assert shapes[1] == (4, max(tokens)) and max(tokens) < clf.max_length


def test_queue_full_gives_503_then_recovers(tiny_model_dir, clf):
    gated = Gated(clf)
    app = create_app(tiny_model_dir, classifier=gated, options=ServeOptions(max_queue=1, batching=False))

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            busy = asyncio.create_task(c.post("/classify", json={"texts": ["first"]}))
            while not gated.entered.is_set():  # the worker holds "first" at the gate
                await asyncio.sleep(0.01)
            queued = asyncio.create_task(c.post("/classify", json={"texts": ["second"]}))
            while app.state.worker.queue.qsize() < 1:
                await asyncio.sleep(0.01)
            refused = await c.post("/classify", json={"texts": ["third"]})
            gated.gate.set()
            return await busy, await queued, refused, await c.post("/classify", json={"texts": ["fourth"]})

    with running(app) as (url, _):
        busy, queued, refused, after = asyncio.run(scenario(url))
        metrics = httpx.get(f"{url}/metrics").text
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "retry later" in refused.json()["detail"]
    assert busy.status_code == queued.status_code == after.status_code == 200
    assert metric(metrics, "newslora_rejected_requests_total", reason="queue_full") == 1


def test_input_limits(tiny_model_dir, clf):
    opts = ServeOptions(max_texts=4, max_text_bytes=64, max_body_bytes=2048)
    with running(create_app(tiny_model_dir, classifier=clf, options=opts)) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/classify", json={"texts": ["a headline"] * 5})
            assert r.status_code == 413 and "5 texts in one request; the limit is 4" in r.json()["detail"]
            r = c.post("/classify", json={"texts": ["ok", "é" * 40]})  # 80 UTF-8 bytes
            assert r.status_code == 413 and "texts[1] is over 64 UTF-8 bytes" in r.json()["detail"]
            r = c.post("/classify", content=b'{"texts": ["' + b"a" * 3000 + b'"]}',
                       headers={"content-type": "application/json"})
            assert r.status_code == 413 and "request body is over 2048 bytes" in r.json()["detail"]

            def chunks():  # no Content-Length: counted as it streams
                yield b'{"texts": ["'
                for _ in range(10):
                    yield b"a" * 500
                yield b'"]}'

            r = c.post("/classify", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413 and "request body is over 2048 bytes" in r.json()["detail"]
            r = c.post("/classify", content=b'{"texts": ["ok", "\\ud800 lone surrogate"]}',
                       headers={"content-type": "application/json"})
            assert r.status_code == 422 and "texts[1] is not valid Unicode" in r.json()["detail"]
            for bad in ([], [" "], [""]):
                assert c.post("/classify", json={"texts": bad}).status_code == 422
            r = c.post("/classify", json={"texts": "not a list"})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "texts"]
            assert c.post("/classify", json={"texts": ["still serving"]}).status_code == 200


def test_bearer_token(tiny_model_dir, clf):
    app = create_app(tiny_model_dir, classifier=clf, options=ServeOptions(token="s3cret"))
    with running(app) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/health").status_code == 200
            r = c.post("/classify", json={"texts": ["Stocks fall"]})
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            assert c.post("/classify", json={"texts": ["x"]}, headers={"Authorization": "Bearer nope"}).status_code \
                == 401
            assert c.get("/metrics").status_code == 401 and c.get("/labels").status_code == 401
            ok = {"Authorization": "Bearer s3cret"}
            assert c.post("/classify", json={"texts": ["Stocks fall"]}, headers=ok).status_code == 200
            assert c.get("/labels", headers=ok).json()["labels"] == clf.label_names
            assert metric(c.get("/metrics", headers=ok).text, "newslora_rejected_requests_total",
                          reason="unauthorized") == 4


def test_non_loopback_host_needs_token(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("NEWSLORA_API_TOKEN", raising=False)
    with pytest.raises(NewsloraError, match="not loopback.*NEWSLORA_API_TOKEN"):
        serve(tiny_model_dir, host="0.0.0.0")


def test_graceful_shutdown_finishes_in_flight(tiny_model_dir, clf):
    gated = Gated(clf)
    app = create_app(tiny_model_dir, classifier=gated)
    result = {}

    def client(url):
        result["r"] = httpx.post(f"{url}/classify", json={"texts": ["in flight"]}, timeout=60)

    with running(app) as (url, server):
        t = threading.Thread(target=client, args=(url,))
        t.start()
        assert gated.entered.wait(30)
        server.should_exit = True  # what SIGTERM does: stop accepting, wait for in-flight requests
        time.sleep(0.3)
        gated.gate.set()
        t.join(30)
    assert result["r"].status_code == 200 and result["r"].json()["results"][0]["label"] in clf.label_names
    assert not app.state.worker.thread.is_alive()  # the lifespan stopped the worker after the last request


def test_openapi_docs(tiny_model_dir, clf):
    with running(create_app(tiny_model_dir, classifier=clf)) as (url, _):
        spec = httpx.get(f"{url}/openapi.json").json()
        assert {"/classify", "/labels", "/health", "/metrics"} <= set(spec["paths"])
        assert {"413", "422", "503"} <= set(spec["paths"]["/classify"]["post"]["responses"])
        assert httpx.get(f"{url}/docs").status_code == 200


def test_slow_drip_request_is_cut_at_the_read_deadline(tiny_model_dir, clf):
    """A client that trickles its headers (or its body) loses the connection at the read deadline; a normal request
    on a kept-alive connection is unaffected."""
    with running(create_app(tiny_model_dir, classifier=clf), read_timeout=1.0) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        for head, drip in ((b"POST /classify HTTP/1.1\r\nHost: x\r\n", b"X-a: b\r\n"),
                           (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100\r\n\r\n{", b" ")):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(head)
                t0, closed = time.monotonic(), False
                while time.monotonic() - t0 < 8:
                    try:
                        s.sendall(drip)
                    except OSError:
                        closed = True
                        break
                    s.settimeout(0.3)
                    try:
                        if s.recv(1024) == b"":
                            closed = True
                            break
                    except socket.timeout:
                        pass
                assert closed and time.monotonic() - t0 < 4, "the slow-drip connection was held open"
        with httpx.Client(base_url=url, timeout=30) as c:  # keep-alive: two requests, one connection, both fine
            for _ in range(2):
                assert c.post("/classify", json={"texts": ["Stocks fall"]}).status_code == 200
                time.sleep(1.5)  # idle longer than the read deadline between requests: still served


def test_token_guards_docs_and_health_is_bare(tiny_model_dir, clf):
    with running(create_app(tiny_model_dir, classifier=clf, options=ServeOptions(token="s3cret"))) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as c:
            health = c.get("/health")
            assert health.status_code == 200 and str(tiny_model_dir) not in health.text
            assert "model" not in health.json()
            for path in ("/docs", "/openapi.json"):
                assert c.get(path).status_code == 401, path
                assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
            spec = c.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).text
            assert "/classify" in spec and str(tiny_model_dir) not in spec


def test_shutdown_answers_in_flight_and_closes_idle_keep_alive_connections(tiny_model_dir, clf):
    """SIGTERM's graceful shutdown with keep-alive clients: the in-flight request is answered, an idle kept-alive
    connection is closed cleanly (EOF, not a reset)."""
    gated = Gated(clf)
    result = {}
    with running(create_app(tiny_model_dir, classifier=gated)) as (url, server):
        host, port = url.removeprefix("http://").split(":")
        idle = socket.create_connection((host, int(port)), timeout=30)
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):  # the whole answer; the connection stays open, idle
            answer += idle.recv(4096)
        assert b"200 OK" in answer

        def client():
            with httpx.Client(base_url=url, timeout=60) as c:
                result["r"] = c.post("/classify", json={"texts": ["in flight"]})

        t = threading.Thread(target=client)
        t.start()
        assert gated.entered.wait(30)
        server.should_exit = True  # what SIGTERM does
        try:
            assert idle.recv(4096) == b""  # closed cleanly by the server, no reset
        finally:
            idle.close()
            gated.gate.set()
            t.join(30)
    assert result["r"].status_code == 200 and result["r"].json()["results"][0]["label"] in clf.label_names
