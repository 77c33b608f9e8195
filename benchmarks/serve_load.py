"""`fmoe serve` under load: throughput with continuous batching, latency, and overload.

A server (tiny-mixtral, lru, up to 32 running; CPU; routing not recorded) runs in this
process on 127.0.0.1 at a free port, once per ``--cache-experts`` size: every expert
cached (32: batching alone) and half of them (16: the batch's experts no longer fit, so
every iteration also loads experts). The same greedy requests
(mt-bench prompts, ``--max-tokens`` each) are served

1. one at a time (each sent when the previous answer arrived): the baseline;
2. by C concurrent clients, C = 8 and 32 (closed loop: each client sends its next request
   when its answer arrives), through the HTTP API.

The three levels run ``--repeats`` times, alternated (the machine is shared: a busy
spell then hits every level). For each: generated tokens per second of wall time (the
median over the repeats), its ratio to one at a time (the goal: >= 3x at C = 8), p50/p99
TTFT (from the request's arrival at the server to its first token, queueing included)
and TPOT (a request's mean time between tokens), measured in the engine thread; and
whether every answer equals its one-at-a-time answer.

3. Overload: a server with 8 running and 8 waiting gets ``--overload`` requests at once;
   the ones past the queue get 429 with Retry-After; each client then retries after
   Retry-After (for at most ``--retry-for-s`` seconds). Reported: first-attempt status
   counts, and that every request was finally answered with its one-at-a-time answer
   (nothing lost, nothing mixed).

The clients run in a separate process (as real clients do), so their event loop does not
share the server's interpreter. torch runs on one thread (the copy thread needs the other
core of a 2-core machine). Figures are this machine's, on a random-weight tiny model: they show what batching buys
at the executor's per-iteration cost, not a GPU's throughput. Run:
``.venv/bin/python benchmarks/serve_load.py [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realrun.serve.engine import EngineListener, Job  # noqa: E402
from realrun.serve.server import BackgroundServer, ServeConfig, build, prepare  # noqa: E402
from traces.prompts import load_prompts  # noqa: E402

MODEL = "tiny-mixtral"
CONCURRENCY = (1, 8, 32)


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


class Timings(EngineListener):
    """Forwards to the server's metrics and keeps each request's TTFT and token gaps."""

    def __init__(self, inner: EngineListener) -> None:
        self.inner = inner
        self.ttft: dict[str, float] = {}
        self.gaps: dict[str, list[float]] = {}

    def queue_changed(self, waiting: int, running: int) -> None:
        self.inner.queue_changed(waiting, running)

    def first_token(self, job: Job, seconds: float) -> None:
        self.ttft[job.request_id] = seconds
        self.gaps[job.request_id] = []
        self.inner.first_token(job, seconds)

    def next_token(self, job: Job, seconds: float) -> None:
        self.gaps[job.request_id].append(seconds)
        self.inner.next_token(job, seconds)

    def finished(self, job: Job, reason: str, e2e_s: float) -> None:
        self.inner.finished(job, reason, e2e_s)

    def iteration(self, engine) -> None:
        self.inner.iteration(engine)

    def take(self) -> tuple[list[float], list[float]]:
        """TTFTs and per-request TPOTs since the last call."""
        ttft = list(self.ttft.values())
        tpot = [statistics.fmean(g) for g in self.gaps.values() if g]
        self.ttft, self.gaps = {}, {}
        return ttft, tpot


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


async def run_closed_loop(
    url: str, bodies: list[dict], concurrency: int, retry_for_s: float = 0.0
) -> tuple[list[dict | None], list[int], float]:
    """Serve ``bodies`` with ``concurrency`` clients; a 429 is retried after its
    Retry-After for up to ``retry_for_s`` seconds. Returns answers (in body order; None:
    never answered), first-attempt status codes, and wall seconds."""
    todo: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        todo.put_nowait(i)
    answers: list[dict | None] = [None] * len(bodies)
    first: list[int] = [0] * len(bodies)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(c: httpx.AsyncClient) -> None:
        while not todo.empty():
            i = todo.get_nowait()
            give_up = time.perf_counter() + retry_for_s
            while True:
                r = await c.post(url + "/v1/completions", json=bodies[i])
                first[i] = first[i] or r.status_code
                if r.status_code == 200:
                    answers[i] = r.json()
                if r.status_code != 429 or time.perf_counter() > give_up:
                    break
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        await asyncio.gather(*[client(c) for _ in range(concurrency)])
    return answers, first, time.perf_counter() - t0


def load_in_child(pool, url: str, bodies: list[dict], concurrency: int, retry_for_s: float = 0.0):
    """:func:`run_closed_loop` in the client process ``pool`` (a real client is another
    process: its event loop must not share the server's interpreter and lock)."""
    return pool.apply(_closed_loop_sync, (url, bodies, concurrency, retry_for_s))


def _closed_loop_sync(url: str, bodies: list[dict], concurrency: int, retry_for_s: float):
    return asyncio.run(run_closed_loop(url, bodies, concurrency, retry_for_s))


def levels(clients, bodies: list[dict], cache_experts: int, repeats: int) -> dict:
    """Steps 1-2 on a server caching ``cache_experts`` experts: per concurrency level,
    the median tokens/s over ``repeats`` alternated runs, TTFT/TPOT percentiles, and
    whether every answer equals its one-at-a-time answer."""
    cfg = ServeConfig(
        model=MODEL, policy="lru", cache_experts=cache_experts, max_batch=32, max_queue=64,
        threads=1,
    )  # fmt: skip
    built = build(prepare(cfg), log)
    timings = Timings(built.engine.listener)
    built.engine.listener = timings
    samples: dict[int, list[dict]] = {c: [] for c in CONCURRENCY}
    solo = None
    with BackgroundServer(built) as srv:
        for rep in range(repeats):  # alternated, so a busy spell hits every level
            for conc in CONCURRENCY:
                answers, codes, wall = load_in_child(clients, srv.url, bodies, conc)
                assert codes == [200] * len(bodies), codes
                tokens = sum(a["usage"]["completion_tokens"] for a in answers)
                texts_out = [a["choices"][0]["text"] for a in answers]
                solo = texts_out if solo is None else solo
                ttft, tpot = timings.take()
                samples[conc].append(
                    {
                        "tokens_per_s": tokens / wall,
                        "ttft": ttft,
                        "tpot": tpot,
                        "same": texts_out == solo,
                    }
                )
                log(
                    f"cache {cache_experts}, repeat {rep}, concurrency {conc}: {tokens / wall:.1f} tokens/s"
                )
        hit_rate = built.summary()["hit_rate"]
    base = statistics.median(s["tokens_per_s"] for s in samples[1])
    runs = []
    for conc, ss in samples.items():
        rates = [s["tokens_per_s"] for s in ss]
        ttft = [x for s in ss for x in s["ttft"]]
        tpot = [x for s in ss for x in s["tpot"]]
        runs.append(
            {
                "concurrency": conc,
                "tokens_per_s_median": round(statistics.median(rates), 1),
                "tokens_per_s_each": [round(r, 1) for r in rates],
                "speedup_vs_one_at_a_time": round(statistics.median(rates) / base, 2),
                "ttft_p50_s": pct(ttft, 50),
                "ttft_p99_s": pct(ttft, 99),
                "tpot_p50_s": pct(tpot, 50),
                "tpot_p99_s": pct(tpot, 99),
                "answers_equal_one_at_a_time": all(s["same"] for s in ss),
            }
        )
    return {"cache_experts": cache_experts, "hit_rate": hit_rate, "runs": runs, "solo": solo}


def overload(clients, bodies: list[dict], solo: list[str], args) -> dict:
    """Step 3: ``args.overload`` requests at once on 8 running + 8 waiting."""
    cfg = ServeConfig(
        model=MODEL, policy="lru", cache_experts=min(args.cache_experts), max_batch=8,
        max_queue=8, threads=1,
    )  # fmt: skip
    built = build(prepare(cfg), log)
    n = args.overload
    load = [bodies[i % len(bodies)] for i in range(n)]
    want = [solo[i % len(bodies)] for i in range(n)]
    with BackgroundServer(built) as srv:
        answers, first, wall = load_in_child(clients, srv.url, load, n, args.retry_for_s)
        rejected = built.metrics.rejected_total.labels(reason="queue_full")._value.get()
    pairs = [(a["choices"][0]["text"], w) for a, w in zip(answers, want, strict=True) if a]
    return {
        "sent_at_once": n,
        "max_batch": 8,
        "max_queue": 8,
        "cache_experts": min(args.cache_experts),
        "first_attempt_200": first.count(200),
        "first_attempt_429": first.count(429),
        "first_attempt_other": n - first.count(200) - first.count(429),
        "429s_counted_by_server_with_retries": int(rejected),
        "finally_answered": len(pairs),
        "answers_equal_one_at_a_time": all(a == w for a, w in pairs),
        "wall_s": round(wall, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--cache-experts",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[32, 16],
        help="comma-separated cache sizes, each a server of its own (tiny-mixtral has 32)",
    )
    ap.add_argument("--overload", type=int, default=64, help="requests sent at once in step 3")
    ap.add_argument(
        "--retry-for-s", type=float, default=600, help="step 3: how long a client retries a 429"
    )
    ap.add_argument("--repeats", type=int, default=2, help="runs of each concurrency, alternated")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    clients = multiprocessing.get_context("spawn").Pool(1)  # the load generator's process
    texts = [p.text for p in load_prompts("mt-bench", args.requests)]
    bodies = [
        {"model": MODEL, "prompt": t[:200], "max_tokens": args.max_tokens, "temperature": 0}
        for t in texts
    ]
    out: dict = {"model": MODEL, "requests": len(bodies), "max_tokens": args.max_tokens}
    out["levels"] = [levels(clients, bodies, c, args.repeats) for c in args.cache_experts]
    solo = out["levels"][0].pop("solo")
    for lv in out["levels"][1:]:  # the same greedy answers whatever the cache holds
        assert lv.pop("solo") == solo
    out["overload"] = overload(clients, bodies, solo, args)
    log(json.dumps(out["overload"]))
    clients.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{MODEL}, lru, {len(bodies)} requests x {args.max_tokens} tokens, CPU, 1 torch thread")
    print(f"tokens/s: median of {args.repeats} alternated runs (each run's figure in --json)")
    for lv in out["levels"]:
        print(f"-- {lv['cache_experts']} of 32 experts cached (hit rate {lv['hit_rate']:.3f})")
        print(
            f"{'conc':>4} {'tok/s':>8} {'x solo':>7} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>8}  same answers"
        )
        for r in lv["runs"]:
            print(
                f"{r['concurrency']:>4} {r['tokens_per_s_median']:>8.1f} {r['speedup_vs_one_at_a_time']:>7.2f} "
                f"{r['ttft_p50_s']:>9.4f} {r['ttft_p99_s']:>8.4f} {r['tpot_p50_s']:>9.4f} "
                f"{r['tpot_p99_s']:>8.4f}  {r['answers_equal_one_at_a_time']}"
            )
    print("overload:", json.dumps(out["overload"]))


if __name__ == "__main__":
    main()
