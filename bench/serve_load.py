"""Load test of ``newslora serve`` on 127.0.0.1: micro-batching on vs off, a soak, and an overload burst.

One command (repo root, venv active):

    HF_HUB_OFFLINE=1 python bench/serve_load.py --model RUN/onnx-int8

For each mode (``--batching`` and ``--no-batching``) a server subprocess is started on a free 127.0.0.1 port
and warmed up; then, at each concurrency (1, 16, 64), ``--requests`` requests of ``--texts`` AG News test
headlines each are sent by that many concurrent httpx clients. Reported per row: requests/s, texts/s, p50/p99
latency, errors (any non-200 or transport error) and the server's RSS before and after. Then (batching on) a
soak of ``--soak`` requests at concurrency 16, RSS sampled after the first 10% (warm-up) and at the end, and
an overload burst against a server with a tiny queue (``--max-queue 4``) at concurrency 64: it must answer
200 or 503 (with Retry-After) to every request, and stay healthy. Everything is bounded in count and time and
targets 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWSLORA_SHARED", REPO.parent / "shared"))
TEST_CSV = SHARED / "data" / "ag_news" / "test.csv"
HOST = "127.0.0.1"  # never anything else


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, model: str, *extra: str, log: Path):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("NEWSLORA_API_TOKEN", None)
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "newslora.cli", "serve", model, "--host", HOST,
                                      "--port", str(self.port), *extra], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env)

    def wait(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not start")

    def rss(self) -> float:
        return rss_mib(self.proc.pid)

    def stop(self) -> str:
        """SIGTERM, then how it ended (uvicorn re-raises the signal after its graceful shutdown: exit -15)."""
        self.proc.terminate()
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = -9
        self.log.close()
        graceful = "Application shutdown complete" in Path(self.log.name).read_text()
        return f"exit {rc}, {'graceful shutdown completed' if graceful else 'NO graceful shutdown'}"


async def load(url: str, bodies: list[dict], concurrency: int, timeout: float = 120) -> dict:
    """Send every body once with ``concurrency`` workers; latencies of the 200s, status counts, errors."""
    import httpx

    latencies, statuses, retry_after, errors = [], {}, 0, 0
    nxt = iter(bodies)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client):
        nonlocal retry_after, errors
        for body in nxt:
            t = time.perf_counter()
            try:
                r = await client.post("/classify", json=body)
            except httpx.HTTPError:
                errors += 1
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t)
            elif r.status_code == 503 and r.headers.get("Retry-After"):
                retry_after += 1

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    lat = sorted(latencies) or [float("nan")]
    return {"requests": len(bodies), "ok": ok, "statuses": statuses, "transport_errors": errors,
            "errors": len(bodies) - ok, "retry_after_503": retry_after, "seconds": wall,
            "requests_per_s": ok / wall, "texts_per_s": ok * len(bodies[0]["texts"]) / wall,
            "p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="run folder, merged folder or ONNX folder to serve")
    p.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    p.add_argument("--texts", type=int, default=1, help="texts per request")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--soak", type=int, default=10_000, help="requests of the soak (0: skip)")
    p.add_argument("--overload", type=int, default=2_000, help="requests of the overload burst (0: skip)")
    p.add_argument("--output", default=None, help="also write the figures as JSON here")
    a = p.parse_args()
    levels = [int(x) for x in a.concurrency.split(",")]

    from newslora.data import read_table

    headlines = read_table(TEST_CSV)["text"].tolist()

    def bodies(n: int, offset: int = 0) -> list[dict]:
        return [{"texts": [headlines[(offset + i * a.texts + j) % len(headlines)] for j in range(a.texts)]}
                for i in range(n)]

    logdir = Path(os.environ.get("TMPDIR", "/tmp"))
    print(f"model {a.model} | {os.cpu_count()} logical cores (server and clients share them) | "
          f"{a.requests} requests x {a.texts} text(s) per level | "
          f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}", flush=True)
    results: dict = {"model": a.model, "rows": [], "soak": None, "overload": None}
    for mode in ("--batching", "--no-batching"):
        server = Server(a.model, mode, log=logdir / f"newslora-serve-load{mode}.log")
        try:
            server.wait()
            asyncio.run(load(server.url, bodies(200), 16))  # warm-up: allocator, kernels, batch shapes
            for c in levels:
                before = server.rss()
                r = asyncio.run(load(server.url, bodies(a.requests, offset=c), c))
                r.update(mode=mode.lstrip("-"), concurrency=c, rss_before_mib=before, rss_after_mib=server.rss())
                results["rows"].append(r)
                print(f"{r['mode']:<11} c={c:<3} {r['requests_per_s']:8.1f} req/s {r['texts_per_s']:8.1f} texts/s "
                      f"p50 {r['p50_ms']:7.1f} ms p99 {r['p99_ms']:7.1f} ms errors {r['errors']} "
                      f"RSS {before:.0f} -> {r['rss_after_mib']:.0f} MiB", flush=True)
            if mode == "--batching" and a.soak:
                warm = max(1, a.soak // 10)
                asyncio.run(load(server.url, bodies(warm, offset=7), 16))
                rss_warm = server.rss()
                r = asyncio.run(load(server.url, bodies(a.soak - warm, offset=11), 16))
                r.update(total_requests=a.soak, rss_after_warmup_mib=rss_warm, rss_end_mib=server.rss())
                r["rss_growth_mib"] = r["rss_end_mib"] - rss_warm
                results["soak"] = r
                print(f"soak: {a.soak} requests at c=16 ({warm} warm-up), errors {r['errors']}, "
                      f"{r['requests_per_s']:.1f} req/s, RSS after warm-up {rss_warm:.0f} MiB -> end "
                      f"{r['rss_end_mib']:.0f} MiB ({r['rss_growth_mib']:+.0f} MiB)", flush=True)
        finally:
            print(f"server {mode} stopped by SIGTERM: {server.stop()}", flush=True)

    if a.overload:
        server = Server(a.model, "--batching", "--max-queue", "4", log=logdir / "newslora-serve-overload.log")
        try:
            server.wait()
            r = asyncio.run(load(server.url, bodies(a.overload), 64, timeout=60))
            import httpx

            healthy = httpx.get(f"{server.url}/health", timeout=10).status_code == 200
            after = asyncio.run(load(server.url, bodies(50), 1))
            r.update(healthy_after=healthy, ok_after=after["ok"], alive=server.proc.poll() is None)
            results["overload"] = r
            print(f"overload: {a.overload} requests at c=64, queue 4: statuses {r['statuses']}, transport errors "
                  f"{r['transport_errors']}, 503 with Retry-After {r['retry_after_503']}, {r['seconds']:.1f} s; "
                  f"healthy after: {healthy}, {after['ok']}/50 ok after", flush=True)
        finally:
            print(f"overload server stopped by SIGTERM: {server.stop()}", flush=True)

    by = {(r["mode"], r["concurrency"]): r for r in results["rows"]}
    for c in levels:
        if ("batching", c) in by and ("no-batching", c) in by:
            ratio = by[("batching", c)]["texts_per_s"] / by[("no-batching", c)]["texts_per_s"]
            print(f"texts/s batching / no-batching at c={c}: {ratio:.2f}x")
    if a.output:
        Path(a.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
