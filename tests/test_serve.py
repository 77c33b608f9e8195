"""`fmoe serve` (realrun.serve): the OpenAI API over the real executor, on 127.0.0.1.

One server (tiny-mixtral, lru, 10 of 32 experts cached, routing recorded) runs in a
thread for the module at a port chosen free at run time; the SIGTERM test starts its
own as a subprocess. Answers are checked against the same server serving each prompt
alone; the recorded routing is replayed by the simulator, which must see the server's
exact hits, misses and bytes. Every loop here is bounded (time or count).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from realrun.serve.server import BackgroundServer, ServeConfig, build, prepare

MODEL = "tiny-mixtral"
CACHE = 10
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(one_torch_thread, tmp_path_factory):
    cfg = ServeConfig(
        model=MODEL,
        policy="lru",
        cache_experts=CACHE,
        max_batch=8,
        max_queue=64,
        capture=str(tmp_path_factory.mktemp("serve") / "unused.fmoe"),  # records routing
        threads=1,
        grace_s=1.0,
    )
    built = build(prepare(cfg), progress=lambda _m: None)
    with BackgroundServer(built) as srv:
        yield srv


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@contextlib.contextmanager
def limits(server, max_batch: int, max_queue: int):
    """The module server's batch and queue bounds, changed for one test."""
    eng = server.built.engine
    old = eng.max_batch, eng.max_queue
    eng.max_batch, eng.max_queue = max_batch, max_queue
    try:
        yield
    finally:
        eng.max_batch, eng.max_queue = old


def scrape(server_or_url) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    url = getattr(server_or_url, "url", server_or_url)
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(m: dict, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(
        v
        for (n, lab), v in m.items()
        if n == name and all(dict(lab).get(k) == x for k, x in labels.items())
    )


def wait_until(cond, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def complete(url: str, prompt: str, n: int = 4, **kw) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, **kw}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


# -- the OpenAI client -----------------------------------------------------------------------
def test_models_completions_and_chat_through_the_openai_client(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    c = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0)
    assert c.object == "text_completion" and c.choices[0].finish_reason in ("length", "stop")
    assert c.usage.prompt_tokens == len(b"The sky is")
    assert c.usage.completion_tokens == 5 or c.choices[0].finish_reason == "stop"
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    again = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0)
    assert again.choices[0].text == c.choices[0].text  # greedy: the same answer
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    # the byte tokenizer has no chat template: 'role: content' lines, then 'assistant:'
    assert chat.usage.prompt_tokens == len(b"system: be brief\nuser: hi\nassistant:")
    plain = client.completions.create(
        model=MODEL, prompt="system: be brief\nuser: hi\nassistant:", max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.content == plain.choices[0].text


def test_streams_add_up_to_the_whole_answer_and_end_with_done(client, server):
    whole = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stream"}], max_tokens=6, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "stream"}],
            max_tokens=6,
            temperature=0,
            stream=True,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # raw SSE: data lines, the last one [DONE]; include_usage adds a usage chunk, no choices
    r = complete(server.url, "raw", 5, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] == 5
    streamed = "".join(o["choices"][0]["text"] for o in objs[:-1])
    assert streamed == complete(server.url, "raw", 5).json()["choices"][0]["text"]


def test_stop_strings_seed_and_sampling(server):
    full = complete(server.url, "stop here", 12).json()["choices"][0]["text"]
    stop = full[3]
    cut = complete(server.url, "stop here", 12, stop=[stop, "never seen"]).json()
    assert cut["choices"][0]["text"] == full[: full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] <= 12
    seeded = [
        complete(server.url, "dice", 8, temperature=1.5, top_p=0.9, seed=7).json() for _ in range(2)
    ]
    assert seeded[0]["choices"][0]["text"] == seeded[1]["choices"][0]["text"]
    # top_p = 0 keeps only the most likely token: the greedy answer
    narrow = complete(server.url, "dice", 8, temperature=1.0, top_p=0.0, seed=1).json()
    assert (
        narrow["choices"][0]["text"] == complete(server.url, "dice", 8).json()["choices"][0]["text"]
    )


def test_errors_are_openai_error_objects_and_the_server_keeps_serving(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, presence_penalty=0.5)
    assert e.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x" * 600, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=3)
    assert e.value.body["param"] == "temperature"
    raw = [
        httpx.post(server.url + "/v1/completions", content=b"{not json"),
        httpx.post(server.url + "/v1/completions", json=[1, 2]),
        httpx.post(
            server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "bogus": 1}
        ),
        httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [1, 999]}),
        httpx.post(  # a lone surrogate: valid JSON, not encodable text
            server.url + "/v1/completions", content=json.dumps({"model": MODEL, "prompt": "\ud800"})
        ),
        httpx.post(  # lone surrogates quoted back in the error: escaped, not a 500
            server.url + "/v1/completions",
            content=json.dumps({"model": MODEL, "prompt": "x", "\ud800": 1}),
        ),
        httpx.post(
            server.url + "/v1/completions", content=json.dumps({"model": "\udfff", "prompt": "x"})
        ),
        httpx.get(server.url + "/v1/completions"),
        httpx.get(server.url + "/v2/nothing"),
    ]
    assert [r.status_code for r in raw] == [400, 400, 400, 400, 400, 400, 404, 405, 404]
    for r in raw:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in r.text
    assert raw[2].json()["error"]["param"] == "bogus"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert complete(server.url, "still here", 2).status_code == 200


# -- continuous batching ---------------------------------------------------------------------
PROMPTS = [f"request {i}: " + "abcdefgh"[: 1 + i % 8] * (1 + i % 3) for i in range(48)]


def test_48_concurrent_greedy_requests_get_their_solo_answers_and_the_counters_add_up(
    server, tmp_path
):
    """Alone, then all 48 at once (8 run, the rest wait and join as slots free): the same
    text and token counts; /metrics counts every request and token; the recorded routing
    replays in the simulator (lru, the server's schedule) with the server's exact hits,
    misses and bytes."""
    lens = [2 + i % 4 for i in range(48)]
    solo = [complete(server.url, p, n).json() for p, n in zip(PROMPTS, lens, strict=True)]
    before = scrape(server)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            body = [
                {"model": MODEL, "prompt": p, "max_tokens": n, "temperature": 0}
                for p, n in zip(PROMPTS, lens, strict=True)
            ]
            return await asyncio.gather(
                *[c.post(server.url + "/v1/completions", json=b) for b in body]
            )

    got = asyncio.run(burst())
    assert [r.status_code for r in got] == [200] * 48
    for want, r in zip(solo, got, strict=True):
        ans = r.json()
        assert ans["choices"][0]["text"] == want["choices"][0]["text"]
        assert ans["usage"] == want["usage"]
    assert wait_until(lambda: scrape(server)[("fmoe_running_requests", ())] == 0)
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    usage = [r.json()["usage"] for r in got]
    assert delta("fmoe_requests_finished_total") == 48
    assert delta("fmoe_http_responses_total", endpoint="/v1/completions", status="200") == 48
    assert delta("fmoe_generation_tokens_total") == sum(u["completion_tokens"] for u in usage)
    assert delta("fmoe_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert delta("fmoe_time_to_first_token_seconds_count") == 48
    assert delta("fmoe_time_per_output_token_seconds_count") == sum(
        u["completion_tokens"] - 1 for u in usage
    )
    # requests shared forwards: far fewer iterations than tokens
    assert delta("fmoe_iterations_total") < sum(u["completion_tokens"] for u in usage) / 3
    hits, misses = total(after, "fmoe_expert_hits_total"), total(after, "fmoe_expert_misses_total")
    assert hits + misses == total(after, "fmoe_expert_demands_total") > 0
    assert total(after, "fmoe_miss_actions_total", action="fetch") == misses
    assert total(after, "fmoe_link_bytes_total") == total(after, "fmoe_bytes_h2d_total")
    assert after[("fmoe_queue_depth", ())] == 0

    # the routing of everything served so far replays exactly in the simulator
    path = tmp_path / "served.fmoe"
    n = server.built.write_capture(str(path))
    sim = replay(path, CACHE)
    assert sim["requests"] == n >= 48 + 48
    assert (sim["hits"], sim["misses"]) == (hits, misses)
    assert sim["bytes_h2d"] == total(after, "fmoe_bytes_h2d_total")
    assert sim["iterations"] == total(after, "fmoe_iterations_total")


def replay(path: Path, cache_experts: int) -> dict:
    from sim.config import SimConfig
    from sim.run import simulate
    from specs.presets import load_hardware
    from traces.io import load_workload

    w = load_workload(path)
    cfg = SimConfig(
        model=w.spec,
        hardware=load_hardware("cpu-local"),
        policy="lru",
        cache_experts=cache_experts,
        arrivals="schedule",
    )
    return simulate(w, cfg).metrics


def test_a_full_queue_answers_429_with_retry_after_and_loses_nothing(server, client):
    """One request runs and one waits (max_batch 1, max_queue 1): four more get 429 with
    Retry-After (the openai client raises RateLimitError) and are counted; the running and
    the waiting request still get their own answers."""
    prompts, lens = ["hold the slot", "wait in line"], [200, 4]
    want = [complete(server.url, p, n).json() for p, n in zip(prompts, lens, strict=True)]
    before = scrape(server)
    eng = server.built.engine
    got: dict[int, httpx.Response] = {}

    def send(i: int) -> None:
        got[i] = complete(server.url, prompts[i], lens[i])

    with limits(server, max_batch=1, max_queue=1):
        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        threads[0].start()
        assert wait_until(lambda: eng.running == 1)
        threads[1].start()
        assert wait_until(lambda: eng.waiting == 1)
        refused = [complete(server.url, f"no room {i}", 2) for i in range(3)]
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL, prompt="no room", max_tokens=2)
        for t in threads:
            t.join(120)
    assert e.value.body["code"] == "queue_full"
    for r in refused:
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
    assert [got[i].json()["choices"] for i in range(2)] == [w["choices"] for w in want]
    after = scrape(server)
    rejected = total(after, "fmoe_requests_rejected_total", reason="queue_full") - total(
        before, "fmoe_requests_rejected_total", reason="queue_full"
    )
    assert rejected == 4


def test_a_client_that_disconnects_is_cancelled_and_its_slot_freed(server):
    """A stream closed after its first chunk, and a plain request whose client times out:
    both are cancelled (counted), the batch empties, the next request is served."""
    before = scrape(server)
    with limits(server, max_batch=1, max_queue=4):
        with httpx.Client(timeout=60) as c:
            body = {
                "model": MODEL,
                "prompt": "long",
                "max_tokens": 400,
                "temperature": 0,
                "stream": True,
            }
            with c.stream("POST", server.url + "/v1/completions", json=body) as r:
                next(r.iter_lines())  # the first event arrived; now hang up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                server.url + "/v1/completions",
                json={"model": MODEL, "prompt": "long too", "max_tokens": 400, "temperature": 0},
                timeout=httpx.Timeout(60, read=0.5),
            )
        cancelled = lambda: (  # noqa: E731
            total(scrape(server), "fmoe_requests_finished_total", reason="cancelled")
            - total(before, "fmoe_requests_finished_total", reason="cancelled")
        )
        assert wait_until(lambda: cancelled() == 2)
        assert wait_until(lambda: server.built.engine.running == 0)
        assert complete(server.url, "next one", 2).status_code == 200
    after = scrape(server)
    generated = total(after, "fmoe_generation_tokens_total") - total(
        before, "fmoe_generation_tokens_total"
    )
    assert generated < 400  # neither long request ran to its end


# -- any body --------------------------------------------------------------------------------
_text = st.text(max_size=20) | st.sampled_from(["\ud800", "a\udfffb"])  # lone surrogates too
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
)
_values = st.recursive(
    _scalars,
    lambda v: st.lists(v, max_size=3) | st.dictionaries(_text, v, max_size=3),
    max_leaves=8,
)
_VALID = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.one_of(
        st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=4)
    ),
    "n": st.just(1),
    "stream": st.booleans(),
    "echo": st.just(False),
    "logprobs": st.none(),
    "user": st.text(max_size=10),
}


@st.composite
def bodies(draw) -> tuple[bool, bytes]:
    """A request body for either endpoint: a valid one (unicode text, token ids, any
    supported field) with at most one field wrong (a random JSON value: wrong type, huge,
    unicode) or missing; sometimes no JSON object at all. A valid body always sets
    ``max_tokens`` (missing, chat would default to the whole context: slow, no different)."""
    chat = draw(st.booleans())
    kind = draw(st.sampled_from(["valid", "one-wrong", "one-wrong", "not-an-object", "bytes"]))
    if kind == "bytes":
        return chat, draw(st.binary(max_size=64))
    if kind == "not-an-object":
        return chat, json.dumps(draw(_values)).encode()
    body: dict = {"model": MODEL, "max_tokens": draw(st.integers(1, 4))}
    if chat:
        roles = st.sampled_from(["user", "system", "assistant"])
        msg = st.fixed_dictionaries({"role": roles, "content": st.text(max_size=40)})
        body["messages"] = draw(st.lists(msg, min_size=1, max_size=3))
    else:
        body["prompt"] = draw(
            st.one_of(st.text(max_size=60), st.lists(st.integers(0, 255), min_size=1, max_size=8))
        )
    for key in draw(st.lists(st.sampled_from(sorted(_VALID)), unique=True, max_size=4)):
        body[key] = draw(_VALID[key])
    if kind == "one-wrong":
        key = draw(st.sampled_from(sorted({*body, *_VALID, "bogus", "\ud800"})))
        if draw(st.booleans()) and key in body:
            del body[key]
        else:
            body[key] = draw(_values)
    return chat, json.dumps(body).encode()


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=bodies())
def test_any_request_body_gets_a_4xx_or_a_200_never_a_5xx(server, case):
    chat, raw = case
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = httpx.post(
        server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60
    )
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert "Traceback" not in r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert sse_events(r.text)[-1] == "[DONE]"
    else:
        assert "usage" in r.json()


# -- the command -----------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_serve_help_imports_no_torch_and_bad_flags_are_one_line():
    code = (
        "import sys; from fmoe_cli.main import main\n"
        "try: main(['serve', '--help'])\n"
        "except SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "--max-queue" in out.stdout and "--capture" in out.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cache-experts", "4", "--max-batch", "0"], "--max-batch"),
        (["--cache-experts", "4", "--max-queue", "-1"], "--max-queue"),
        (["--cache-experts", "4", "--port", "70000"], "--port"),
        ([], "one of the arguments --cache-experts --cache-gb is required"),
        (["--cache-experts", "4", "--capture", "/no/such/dir/x.fmoe"], "--capture"),
        (["--cache-gb", "auto"], "cache_gb='auto'"),
        (["--cache-experts", "1"], "top-K"),
    ],
)
def test_bad_serve_flags_are_one_line_and_status_2(capsys, extra, message):
    from fmoe_cli.main import main

    argv = ["serve", "--model", MODEL, "--policy", "lru", *extra]
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err


def test_a_port_in_use_is_one_line_and_status_2(capsys):
    from fmoe_cli.main import main
    from realrun.serve.server import listen

    sock = listen("127.0.0.1", 0)
    try:
        port = str(sock.getsockname()[1])
        rc = main(
            ["serve", "--model", MODEL, "--policy", "lru", "--cache-experts", "4", "--port", port]
        )
    finally:
        sock.close()
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot listen" in err


def test_sigterm_during_load_exits_0_within_the_grace_period_with_a_complete_trace(
    tmp_path, capsys
):
    """`fmoe serve --capture` under 6 concurrent long requests gets SIGTERM: it stops
    accepting, cancels what still runs after --grace-s (those clients get a 503), writes
    the trace and exits 0 in time; `fmoe trace info` loads the trace and `fmoe sim --arrivals schedule` replays it
    with the hits, misses and bytes the server reported."""
    trace = tmp_path / "served.fmoe"
    grace = 1.0
    cmd = [sys.executable, "-m", "fmoe_cli.main", "serve", "--model", MODEL, "--policy", "lru"]
    cmd += ["--cache-experts", str(CACHE), "--port", "0", "--threads", "1"]
    cmd += ["--capture", str(trace), "--grace-s", str(grace), "--max-batch", "8"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    lines: list[str] = []
    url = None
    try:
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            url = m.group(1) if m else None
        assert url is not None, "".join(lines)
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        codes: list[object] = []

        def call(i: int) -> None:
            try:
                codes.append(complete(url, f"load {i}", 300).status_code)
            except httpx.HTTPError as exc:  # cut off at shutdown
                codes.append(type(exc).__name__)

        callers = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(6)]
        for t in callers:
            t.start()

        def loaded() -> bool:  # every request reached the server, and tokens flow
            m = scrape(url)
            seen = sum(
                total(m, n)
                for n in (
                    "fmoe_running_requests",
                    "fmoe_queue_depth",
                    "fmoe_requests_finished_total",
                )
            )
            return seen >= 6 and total(m, "fmoe_generation_tokens_total") >= 8

        assert wait_until(loaded, 60)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=grace + 30)
        took = time.monotonic() - t0
        reader.join(10)
        for t in callers:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = "".join(lines)
    assert rc == 0, log
    assert set(codes) <= {200, 503} and len(codes) == 6, codes  # answered, finished or cut
    assert took < grace + 10, (took, log)  # the grace period, one forward and the write
    assert "Traceback" not in log
    final = json.loads(log.split("final ", 1)[1].splitlines()[0])
    from fmoe_cli.main import main

    capsys.readouterr()
    assert main(["trace", "info", str(trace), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == final["requests_recorded"] == 6
    argv = ["sim", "--trace", str(trace), "--model", MODEL, "--hardware", "cpu-local"]
    argv += ["--policy", "lru", "--cache-experts", str(CACHE), "--arrivals", "schedule", "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["hits"], got["misses"]) == (final["hits"], final["misses"])
    assert got["bytes_h2d"] == final["bytes_h2d"] and got["iterations"] == final["iterations"]
