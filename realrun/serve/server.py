"""`fmoe serve` as functions: check the flags, build the engine, run uvicorn, stop cleanly.

:func:`prepare` checks every flag that can be checked without weights (model, policy,
budget, devices, link, batch and queue sizes, the capture file's folder, the address:
the listening socket is opened here, so a port in use fails before any model work).
:func:`build` loads and offloads the model and starts the engine thread; :func:`serve`
runs the app under uvicorn until SIGINT or SIGTERM, then stops accepting (the socket is
closed and new requests get 503), lets what waits or runs go on for ``grace_s`` seconds,
then cancels the rest (:class:`GracefulStop`: each ends after the forward that runs and
its client gets a 503 or a stream's error event), stops the engine, writes the capture
file atomically and returns 0.
:class:`BackgroundServer` runs a built server in a thread (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from policies.base import Policy
from realrun.runner import ServingPlan, resolve_and_plan
from realrun.serve.app import Served, create_app
from realrun.serve.engine import ServingEngine
from realrun.serve.metrics import ServeMetrics
from realrun.session import RunSession, SessionOptions
from specs.errors import InputError
from specs.model_spec import ModelSpec

Progress = Callable[[str], None]


def _stderr(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


@dataclass
class ServeConfig:
    """Every knob of `fmoe serve` (CLI flags map one to one)."""

    model: str
    policy: str = "lru"
    policy_options: dict[str, Any] = field(default_factory=dict)
    cache_experts: int | None = None
    cache_gb: float | str | None = None  # or "auto" (CUDA)
    reserve_gb: float = 2.0
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the address is printed)
    max_batch: int = 8
    max_queue: int = 64
    capture: str | None = None
    grace_s: float = 5.0
    device: str = "cpu"
    num_devices: int | None = None
    link_gbps: float | None = None
    link_latency_us: float | None = None
    store: str = "auto"
    store_dir: str | None = None
    seed: int = 0
    threads: int | None = None
    train_trace: str | None = None


@dataclass
class Prepared:
    cfg: ServeConfig
    spec: ModelSpec
    policy: Policy
    plan: ServingPlan
    max_positions: int | None


def prepare(cfg: ServeConfig) -> Prepared:
    """Check every flag before any work; InputError names the first problem."""
    spec, hf_config, policy, plan = resolve_and_plan(cfg)
    if cfg.max_batch < 1:
        raise InputError(f"--max-batch must be >= 1, got {cfg.max_batch}")
    if cfg.max_queue < 0:
        raise InputError(f"--max-queue must be >= 0, got {cfg.max_queue}")
    if not cfg.grace_s >= 0:
        raise InputError(f"--grace-s must be >= 0, got {cfg.grace_s}")
    if cfg.threads is not None and cfg.threads < 1:
        raise InputError(f"--threads must be >= 1, got {cfg.threads}")
    if not 0 <= cfg.port <= 65535:
        raise InputError(f"--port must be in [0, 65535], got {cfg.port}")
    if cfg.capture is not None:
        parent = Path(cfg.capture).resolve().parent
        if not parent.is_dir():
            raise InputError(f"--capture {cfg.capture}: directory {parent} does not exist")
    if cfg.train_trace is not None and not Path(cfg.train_trace).is_file():
        raise InputError(f"--train-trace {cfg.train_trace}: no such file")
    return Prepared(cfg, spec, policy, plan, getattr(hf_config, "max_position_embeddings", None))


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); InputError if taken."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise InputError(f"--host {host}: cannot resolve ({exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise InputError(
            f"--host/--port: cannot listen on {host}:{port} ({exc.strerror})"
        ) from None
    sock.set_inheritable(True)
    return sock


@dataclass
class Built:
    """A server ready to run: the app over a started engine. :meth:`close` stops it all."""

    prep: Prepared
    engine: ServingEngine
    metrics: ServeMetrics
    app: Any
    om: Any
    session: RunSession
    tokenizer: Any

    def close(self) -> None:
        """Stop the engine (cancelling what runs), detach the session, free the store."""
        try:
            self.engine.stop()
        finally:
            try:
                self.session.close()
            finally:
                self.om.close()

    def summary(self) -> dict[str, Any]:
        """The served totals under the simulator's names (after :meth:`ServingEngine.stop`:
        every request ended): iterations, cache counters, bytes_h2d, stall_s."""
        snap = self.metrics.snapshot()
        c = snap["counters"]
        return {
            "requests_recorded": len(self.engine.recorded),
            "iterations": snap["iterations"],
            "layer_steps": snap["layer_steps"],
            "demands": c["demands"],
            "hits": c["hits"],
            "misses": c["misses"],
            "hit_rate": c["hits"] / c["demands"] if c["demands"] else None,
            "bytes_h2d": c["bytes_loaded"],
            "link_bytes": snap["link_bytes"],
            "stall_s": snap["stall_s"],
        }

    def write_capture(self, path: str) -> int:
        """Write the served requests' routing to ``path`` (traces format, atomic); returns
        the number of requests written."""
        from realrun.capture import make_workload, write_workload

        cfg = self.prep.cfg
        link = self.session.opts.link
        described = link.describe() if link is not None else {"emulated_link": False}
        reqs = self.engine.trace_requests()
        workload = make_workload(
            self.prep.spec,
            reqs,
            cfg.seed,
            "realrun.serve",
            {
                "policy": cfg.policy,
                "max_batch": cfg.max_batch,
                "batching": "continuous",
                "schedule": "tags.served_iteration (fmoe sim --arrivals schedule)",
                "tokenizer": getattr(self.tokenizer, "name", "unknown"),
                **described,
            },
        )
        write_workload(workload, path)
        return len(reqs)


def build(prep: Prepared, progress: Progress = _stderr) -> Built:
    """Load and offload the model, attach the policy, start the engine thread."""
    from realrun.models import load
    from realrun.offload import offload_model

    cfg = prep.cfg
    torch.set_num_threads(_threads(cfg))
    t0 = time.perf_counter()
    if cfg.train_trace:
        from traces.io import load_workload

        prep.policy.fit(load_workload(cfg.train_trace, prep.spec))
    loaded = load(cfg.model, seed=cfg.seed)
    with torch.no_grad():  # one-time kernel setup should not count as the first request's TTFT
        loaded.model(input_ids=torch.tensor([[0, 1]]), logits_to_keep=1)
    om = offload_model(
        loaded, store=cfg.store, store_dir=cfg.store_dir, dense_device=prep.plan.devices[0]
    )
    try:
        opts = SessionOptions(
            prep.plan.sized(prep.spec),
            prep.plan.devices,
            prep.plan.link,
            record=cfg.capture is not None,
            seed=cfg.seed,
        )
        session = RunSession(om, prep.policy, opts)
    except BaseException:
        om.close()
        raise
    metrics = ServeMetrics(prep.spec.name, cfg.policy)
    tok = loaded.tokenizer
    engine = ServingEngine(
        session,
        tok.decode,
        max_batch=cfg.max_batch,
        max_queue=cfg.max_queue,
        eos_ids=_eos_ids(loaded.model),
        listener=metrics,
    )
    served = Served(
        engine=engine,
        metrics=metrics,
        model_id=prep.spec.name,
        aliases=(cfg.model,),
        encode=tok.encode,
        chat_ids=tok.chat_ids,
        vocab_size=prep.spec.vocab_size,
        max_positions=prep.max_positions,
    )
    engine.start()
    metrics.iteration(engine)
    progress(
        f"loaded {prep.spec.name} ({loaded.source}) in {time.perf_counter() - t0:.1f} s: policy "
        f"{cfg.policy}, {sum(session.res.capacities)} of {prep.spec.total_experts} experts "
        f"cached, up to {cfg.max_batch} running and {cfg.max_queue} waiting"
    )
    return Built(prep, engine, metrics, create_app(served), om, session, tok)


def _threads(cfg: ServeConfig) -> int:
    """torch threads: ``--threads``, else on the CPU every core but one (the copy thread)."""
    if cfg.threads is not None:
        return cfg.threads
    if cfg.device == "cpu":
        return max(1, (os.cpu_count() or 2) - 1)
    return torch.get_num_threads()


def _eos_ids(model: Any) -> list[int]:
    cfg = getattr(model, "generation_config", None) or model.config
    eos = getattr(cfg, "eos_token_id", None)
    return [
        int(e) for e in (eos if isinstance(eos, list | tuple) else [] if eos is None else [eos])
    ]


# uvicorn's own limit on the wait for connections after a signal, past the grace period:
# only reached if a handler hangs (the engine's cancellation answers every request)
BACKSTOP_S = 5.0


def _uvicorn_config(app: Any, grace_s: float) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=grace_s + BACKSTOP_S,
        timeout_keep_alive=5,
    )


class GracefulStop:
    """On the first call: the engine accepts nothing more, and ``grace_s`` later cancels
    what still waits or runs (those clients get a 503, or a stream's error event and
    ``[DONE]``), so uvicorn's wait for open connections ends by itself."""

    def __init__(self, engine: ServingEngine, grace_s: float) -> None:
        self.engine = engine
        self.grace_s = grace_s
        self.timer: threading.Timer | None = None

    def __call__(self) -> None:
        if self.timer is not None:
            return
        self.engine.drain()
        self.timer = threading.Timer(self.grace_s, self.engine.cancel_all)
        self.timer.daemon = True
        self.timer.start()


def _server_class() -> type:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server that drains the engine on a signal and exits normally after
        it (uvicorn itself re-raises the signal once stopped, which kills the process)."""

        on_signal: Callable[[], None] = staticmethod(lambda: None)

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.on_signal()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            old = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

    return _Server


def serve(cfg: ServeConfig, progress: Progress = _stderr) -> int:
    """Run `fmoe serve` until SIGINT or SIGTERM; 0 after a clean stop."""
    prep = prepare(cfg)
    sock = listen(cfg.host, cfg.port)
    try:
        built = build(prep, progress)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    server = _server_class()(_uvicorn_config(built.app, cfg.grace_s))
    stopper = GracefulStop(built.engine, cfg.grace_s)
    server.on_signal = stopper
    progress(
        f"serving {prep.spec.name} on http://{_netloc(host, port)}/v1 (SIGINT/SIGTERM to stop)"
    )
    try:
        server.run(sockets=[sock])
    finally:
        t0 = time.perf_counter()
        if stopper.timer is not None:
            stopper.timer.cancel()
        built.engine.stop()
        if cfg.capture is not None:
            n = built.write_capture(cfg.capture)
            progress(f"wrote {n} requests' routing to {cfg.capture}")
        progress("final " + json.dumps(built.summary()))
        built.close()
        sock.close()
        progress(f"stopped ({time.perf_counter() - t0:.2f} s after the HTTP server)")
    return 0


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BackgroundServer:
    """A built server on 127.0.0.1 at a free port, run by uvicorn in a thread; ``with``
    it, use :attr:`url`; leaving stops uvicorn and closes the built server."""

    def __init__(
        self, built: Built, host: str = "127.0.0.1", start_timeout_s: float = 30.0
    ) -> None:
        self.built = built
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.url = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BackgroundServer:
        import uvicorn

        sock = listen(self.host, 0)
        port = sock.getsockname()[1]
        self._server = uvicorn.Server(_uvicorn_config(self.built.app, self.built.prep.cfg.grace_s))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        self._sock = sock
        self.url = f"http://{_netloc(self.host, port)}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.built.engine.drain()
        self.built.engine.cancel_all()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.built.prep.cfg.grace_s + 10)
        self.built.close()
        self._sock.close()
