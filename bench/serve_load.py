"""Load test of ``newslora serve`` on 127.0.0.1: micro-batching on vs off, a soak, and an overload burst.

One command (repo root, venv active):

    HF_HUB_OFFLINE=1 python bench/serve_load.py --model RUN/onnx-int8

Two server subprocesses run side by side on free 127.0.0.1 ports: ``--batching`` and the baseline
``--no-batching`` (one forward pass per request). Both are warmed up; then, at each concurrency (1, 16, 64), they
are measured in alternation (``--rounds`` rounds, order swapped every round, ``--requests`` requests split across
the rounds) so that both modes see the same machine load, which on a shared machine moves within minutes. Each
request carries ``--texts`` AG News test headlines. Reported per row: texts/s (median over rounds), the median of
the per-round batching/no-batching ratios, p50/p99 latency, errors (any non-200 or transport error), the server's
CPU milliseconds per text (from /proc: what the server spent, whatever else ran), the load generator's, the load
average, and the server's RSS. Before the servers start, the model's own CPU cost per text is timed in-process at
one text per call and at 16 texts per call (same headlines): the most that merging can save per text. Then
(batching on) a soak of ``--soak`` requests at concurrency 16, RSS sampled after the first 10% (warm-up) and at
the end, and an overload burst against a server with a tiny queue (``--max-queue 4``) at concurrency 64: it must
answer 200 or 503 (with Retry-After) to every request, and stay healthy. Everything is bounded in count and time
and targets 127.0.0.1 only.
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def forward_cpu_ms(model: str, headlines: list[str], sizes=(1, 16), texts: int = 64, repeats: int = 3) -> dict:
    """CPU ms per text of ``predict_proba`` (tokenization, padding, forward, softmax) on the same ``texts``
    headlines called ``size`` texts at a time, median of ``repeats``, sizes alternating: what merging saves."""
    import statistics

    from newslora.predict import load_classifier

    clf = load_classifier(model)
    chunk = headlines[:texts]
    clf.predict_proba(chunk[:16])  # warm-up
    times: dict = {b: [] for b in sizes}
    for _ in range(repeats):
        for b in sizes:
            t = time.process_time()
            for i in range(0, texts, b):
                clf.predict_proba(chunk[i:i + b])
            times[b].append(1000 * (time.process_time() - t) / texts)
    del clf
    return {b: statistics.median(v) for b, v in times.items()}


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

    latencies, statuses, retry_after, errors, kinds, idle = [], {}, 0, 0, {}, []
    nxt = iter(bodies)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client):
        nonlocal retry_after, errors
        last = None  # a worker's first request opens its connection
        for body in nxt:
            t = time.perf_counter()
            try:
                r = await client.post("/classify", json=body)
            except httpx.HTTPError as e:
                errors += 1
                kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
                # how long this worker's connection sat unused before the request ("new": it was opening)
                idle.append("new" if last is None else round(t - last, 3))
                last = time.perf_counter()
                continue
            last = time.perf_counter()
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
    return {"requests": len(bodies), "ok": ok, "statuses": statuses, "latencies": latencies,
            "transport_errors": errors, "transport_error_kinds": kinds,
            "transport_error_idle_s": idle,
            "errors": len(bodies) - ok, "retry_after_503": retry_after, "seconds": wall,
            "requests_per_s": ok / wall, "texts_per_s": ok * len(bodies[0]["texts"]) / wall,
            "p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main() -> None:
    import statistics

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="run folder, merged folder or ONNX folder to serve")
    p.add_argument("--requests", type=int, default=400, help="requests per mode and concurrency level")
    p.add_argument("--rounds", type=int, default=4, help="alternations of the two modes per concurrency level")
    p.add_argument("--texts", type=int, default=1, help="texts per request")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--soak", type=int, default=10_000, help="requests of the soak (0: skip)")
    p.add_argument("--overload", type=int, default=2_000, help="requests of the overload burst (0: skip)")
    p.add_argument("--output", default=None, help="also write the figures as JSON here")
    a = p.parse_args()
    levels = [int(x) for x in a.concurrency.split(",")]

    from newslora.readers import read_table

    headlines = read_table(TEST_CSV)["text"].tolist()

    def bodies(n: int, offset: int = 0) -> list[dict]:
        return [{"texts": [headlines[(offset + i * a.texts + j) % len(headlines)] for j in range(a.texts)]}
                for i in range(n)]

    logdir = Path(os.environ.get("TMPDIR", "/tmp"))
    print(f"model {a.model} | {os.cpu_count()} logical cores (servers and clients share them) | "
          f"{a.requests} requests x {a.texts} text(s) per mode and level, {a.rounds} rounds | "
          f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} | load average {os.getloadavg()[0]:.1f}",
          flush=True)
    results: dict = {"model": a.model, "rows": [], "soak": None, "overload": None}
    floor = forward_cpu_ms(a.model, headlines)
    results["forward_cpu_ms_per_text"] = floor
    print("model CPU ms per text in-process (tokenize + forward + softmax): "
          + ", ".join(f"{ms:.2f} at {b} text(s) per call" for b, ms in floor.items()), flush=True)

    modes = ("batching", "no-batching")
    servers = {m: Server(a.model, f"--{m}", log=logdir / f"newslora-serve-load--{m}.log") for m in modes}
    try:
        for server in servers.values():
            server.wait()
        for server in servers.values():
            asyncio.run(load(server.url, bodies(200), 16))  # warm-up: allocator, kernels, batch shapes
        per_round = max(1, a.requests // a.rounds)
        for c in levels:
            rounds: dict = {m: [] for m in modes}
            rss_before = {m: servers[m].rss() for m in modes}
            loads = []
            for k in range(a.rounds):
                for m in (modes if k % 2 == 0 else modes[::-1]):  # ABBA: neither mode always goes first
                    server = servers[m]
                    cpu0, client0 = cpu_seconds(server.proc.pid), time.process_time()
                    r = asyncio.run(load(server.url, bodies(per_round, offset=c * 1000 + k * per_round), c))
                    r["server_cpu_s"] = cpu_seconds(server.proc.pid) - cpu0
                    r["client_cpu_s"] = time.process_time() - client0
                    rounds[m].append(r)
                    loads.append(os.getloadavg()[0])
            for m in modes:
                rs = rounds[m]
                texts_ok = sum(r["ok"] for r in rs) * a.texts
                lat = sorted(x for r in rs for x in r["latencies"]) or [float("nan")]
                row = {"mode": m, "concurrency": c, "rounds": len(rs), "requests": sum(r["requests"] for r in rs),
                       "errors": sum(r["errors"] for r in rs), "statuses": _sum_counts(r["statuses"] for r in rs),
                       "texts_per_s": statistics.median(r["texts_per_s"] for r in rs),
                       "texts_per_s_rounds": [r["texts_per_s"] for r in rs],
                       "p50_ms": 1000 * lat[len(lat) // 2],
                       "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                       "server_cpu_ms_per_text": 1000 * sum(r["server_cpu_s"] for r in rs) / max(texts_ok, 1),
                       "client_cpu_ms_per_text": 1000 * sum(r["client_cpu_s"] for r in rs) / max(texts_ok, 1),
                       "load_average": [min(loads), max(loads)],
                       "rss_before_mib": rss_before[m], "rss_after_mib": servers[m].rss()}
                if m == "batching":
                    row["ratio_rounds"] = [b["texts_per_s"] / n["texts_per_s"]
                                           for b, n in zip(rounds["batching"], rounds["no-batching"])]
                    row["ratio_median"] = statistics.median(row["ratio_rounds"])
                results["rows"].append(row)
                print(f"{m:<11} c={c:<3} {row['texts_per_s']:8.1f} texts/s (rounds "
                      f"{', '.join(f'{x:.0f}' for x in row['texts_per_s_rounds'])}) p50 {row['p50_ms']:7.1f} ms "
                      f"p99 {row['p99_ms']:7.1f} ms errors {row['errors']} | CPU ms/text server "
                      f"{row['server_cpu_ms_per_text']:.1f} client {row['client_cpu_ms_per_text']:.1f} | load "
                      f"{min(loads):.1f}-{max(loads):.1f} | RSS {row['rss_before_mib']:.0f} -> "
                      f"{row['rss_after_mib']:.0f} MiB", flush=True)
            b = results["rows"][-2]
            print(f"texts/s batching / no-batching at c={c}: {b['ratio_median']:.2f}x median of rounds "
                  f"({', '.join(f'{x:.2f}' for x in b['ratio_rounds'])})", flush=True)
        if a.soak:
            server = servers["batching"]
            warm = max(1, a.soak // 10)
            asyncio.run(load(server.url, bodies(warm, offset=7), 16))
            rss_warm = server.rss()
            r = asyncio.run(load(server.url, bodies(a.soak - warm, offset=11), 16))
            del r["latencies"]
            r.update(total_requests=a.soak, rss_after_warmup_mib=rss_warm, rss_end_mib=server.rss())
            r["rss_growth_mib"] = r["rss_end_mib"] - rss_warm
            results["soak"] = r
            print(f"soak: {a.soak} requests at c=16 ({warm} warm-up), errors {r['errors']}, "
                  f"{r['requests_per_s']:.1f} req/s, RSS after warm-up {rss_warm:.0f} MiB -> end "
                  f"{r['rss_end_mib']:.0f} MiB ({r['rss_growth_mib']:+.0f} MiB)", flush=True)
    finally:
        for m, server in servers.items():
            print(f"server --{m} stopped by SIGTERM: {server.stop()}", flush=True)

    if a.overload:
        server = Server(a.model, "--batching", "--max-queue", "4", log=logdir / "newslora-serve-overload.log")
        try:
            server.wait()
            r = asyncio.run(load(server.url, bodies(a.overload), 64, timeout=60))
            del r["latencies"]
            import httpx

            healthy = httpx.get(f"{server.url}/health", timeout=10).status_code == 200
            after = asyncio.run(load(server.url, bodies(50), 1))
            r.update(healthy_after=healthy, ok_after=after["ok"], alive=server.proc.poll() is None)
            results["overload"] = r
            print(f"overload: {a.overload} requests at c=64, queue 4: statuses {r['statuses']}, transport errors "
                  f"{r['transport_errors']} {r['transport_error_kinds'] or ''} (connection idle before: "
                  f"{r['transport_error_idle_s']} s), 503 with Retry-After "
                  f"{r['retry_after_503']}, {r['seconds']:.1f} s; "
                  f"healthy after: {healthy}, {after['ok']}/50 ok after", flush=True)
        finally:
            print(f"overload server stopped by SIGTERM: {server.stop()}", flush=True)

    # With the CPU the limit, the texts/s ratio is at most (CPU per text without merging) / (that, less what
    # merging saves in the model call); the HTTP work per request is the same in both modes.
    nb = {r["concurrency"]: r for r in results["rows"] if r["mode"] == "no-batching"}
    saved = max(0.0, floor[1] - floor[16])
    for c, r in nb.items():
        total = r["server_cpu_ms_per_text"] + r["client_cpu_ms_per_text"]
        print(f"c={c}: no-batching spends {total:.1f} CPU ms per text (server {r['server_cpu_ms_per_text']:.1f} + "
              f"client {r['client_cpu_ms_per_text']:.1f}); merging 16 saves at most {saved:.2f} ms of it in the "
              f"model call: texts/s ratio bound ~{total / max(total - saved, 1e-9):.2f}x when CPU-bound")
    if a.output:
        Path(a.output).write_text(json.dumps(results, indent=2))


def _sum_counts(counts) -> dict:
    out: dict = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


if __name__ == "__main__":
    main()
