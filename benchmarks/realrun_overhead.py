"""Real executor benchmarks on tiny-mixtral-wide (8 experts of ~50 MB per layer, fp32), CPU.

1. Overhead: wall time of the unmodified model vs the offloaded one with every expert
   resident (no-offload policy, so no copies), same process, same prompts, measured
   alternately; the median per-repetition ratio should stay <= 1.10. Outputs are also
   checked bit for bit.
2. Emulated link: TPOT, TTFT and hit rate of fmoe, lru and mixtral-offloading with a
   cache below the model's experts and an emulated 2 GB/s host link (labelled emulated).
   fmoe's expert map store is filled from a trace recorded on separate training prompts
   (the paper's offline setup), which is also how captured traces drive policies.
3. Memory: peak RSS of a fresh process that builds the model, offloads it and runs a
   prompt, for the file store and the RAM store, against the model's size.

torch runs on one thread: the copy thread needs the other core of a 2-core machine, and
the shared machine makes two-thread timings noisy. Run: .venv/bin/python benchmarks/realrun_overhead.py

On a GPU (scripts/gpu_check.sh): ``--device cuda --model DIR --only overhead`` runs the
overhead part alone, both models' dense weights and every expert on the GPU, in the
checkpoint's dtype (bf16 for the random checkpoints the GPU check builds); ``--threads``
then leaves torch's CPU threads alone unless given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.registry import make_policy  # noqa: E402
from realrun.copy_engine import LinkEmulation  # noqa: E402
from realrun.generate import greedy_generate  # noqa: E402
from realrun.models import load  # noqa: E402
from realrun.offload import offload_model  # noqa: E402
from realrun.prompting import encode, prompt_texts  # noqa: E402
from realrun.runner import peak_rss_bytes  # noqa: E402
from realrun.session import RunSession, SessionOptions  # noqa: E402

MODEL = "tiny-mixtral-wide"


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def prompts(tokenizer, first: int, n: int, max_tokens: int):
    texts = prompt_texts("mt-bench", None, first + n)[first:]
    return encode(tokenizer, texts, max_tokens)


def overhead(args) -> tuple[dict, object]:
    """Two copies of the model in one process, measured alternately (A B A B ...)."""
    dev = torch.device(args.device)
    ref_model = load(args.model)
    ref_model.model.to(dev)
    om = offload_model(
        load(args.model), store="file" if dev.type == "cpu" else "auto", dense_device=dev
    )
    ps = prompts(ref_model.tokenizer, 0, args.prompts, args.prompt_tokens)
    t_ref, t_off, exact = [], [], True
    step_ratios = []  # per rep: median offloaded decode step / median unmodified one
    with RunSession(om, make_policy("no-offload"), SessionOptions(None, [dev])) as s:
        for rep in range(args.reps + 1):  # rep 0 warms both up
            t0 = time.perf_counter()
            ref = [
                greedy_generate(
                    ref_model.model, p.request_id, p.ids, args.new_tokens, keep_logits=True
                )
                for p in ps
            ]
            t1 = time.perf_counter()
            got = [s.generate(p.request_id, p.ids, args.new_tokens, keep_logits=True) for p in ps]
            t2 = time.perf_counter()
            if rep:
                t_ref.append(t1 - t0)
                t_off.append(t2 - t1)
                ref_steps = [d for g in ref for d in g.decode_s]
                off_steps = [d for g in got for d in g.decode_s]
                if ref_steps and off_steps:
                    step_ratios.append(statistics.median(off_steps) / statistics.median(ref_steps))
            exact &= all(
                a.output_ids == b.output_ids
                and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))
                for a, b in zip(got, ref, strict=True)
            )
        m = s.metrics()
    del ref_model
    ratios = [b / a for a, b in zip(t_ref, t_off, strict=True)]
    out = {
        "device": str(dev),
        "model": args.model,
        "dtype": str(next(om.loaded.model.parameters()).dtype),
        "unmodified_s": statistics.median(t_ref),
        "offloaded_all_resident_s": statistics.median(t_off),
        "ratio": statistics.median(ratios),
        "decode_step_ratio": statistics.median(step_ratios) if step_ratios else None,
        "decode_step_ratios": step_ratios,
        "ratios": ratios,
        "unmodified_runs_s": t_ref,
        "offloaded_runs_s": t_off,
        "outputs_bitwise_equal": exact,
        "hit_rate": m["hit_rate"],
        "bytes_h2d": m["bytes_h2d"],
    }
    log(
        f"overhead: unmodified {out['unmodified_s']:.3f} s, offloaded {out['offloaded_all_resident_s']:.3f} s, "
        f"median ratio {out['ratio']:.3f} (per rep {', '.join(f'{r:.3f}' for r in ratios)}), exact {exact}"
    )
    return out, om


def emulated_link(args, om) -> list[dict]:
    tok = om.loaded.tokenizer
    train = prompts(tok, args.prompts, args.train_prompts, args.prompt_tokens)
    test = prompts(tok, args.prompts + args.train_prompts, args.prompts, args.prompt_tokens)
    with RunSession(om, make_policy("lru"), SessionOptions(None, record=True)) as s:
        for p in train:
            s.generate(p.request_id, p.ids, args.new_tokens, prompt_text=p.text)
        from realrun.capture import make_workload

        training = make_workload(om.loaded.spec, s.recorder.requests, 0, source="realrun.run")
    link = LinkEmulation(args.link_gbps, args.link_latency_us)
    rows = []
    for name in ["fmoe", "lru", "mixtral-offloading"]:
        pol = make_policy(name)
        pol.fit(training)
        with RunSession(om, pol, SessionOptions(args.cache_experts, link=link)) as s:
            for p in test:
                s.generate(p.request_id, p.ids, args.new_tokens, prompt_text=p.text)
            m = s.metrics()
        row = {
            "policy": name,
            **{
                k: m[k]
                for k in (
                    "tpot_mean_s",
                    "ttft_mean_s",
                    "hit_rate",
                    "stall_s",
                    "bytes_h2d",
                    "prefetch_accuracy",
                    "prefetches_issued",
                    "preemptions",
                    "emulated_link",
                    "link_gbps",
                    "link_latency_us",
                    "cache_experts_total",
                    "tokens_sha256",
                )
            },
        }
        rows.append(row)
        log(
            f"link {args.link_gbps} GB/s (emulated), cache {args.cache_experts}/32: {name:19s} tpot {row['tpot_mean_s']:.4f} s, ttft {row['ttft_mean_s']:.3f} s, hit {row['hit_rate']:.3f}, stall {row['stall_s']:.2f} s"
        )
    return rows


def memory_probe(store: str, cache: int) -> dict:
    """In a fresh process: build, offload, run one prompt; peak RSS vs model size."""
    base = rss_now()
    loaded = load(MODEL)
    spec = loaded.spec
    after_build = rss_now()
    om = offload_model(loaded, store=store)
    with RunSession(om, make_policy("lru"), SessionOptions(cache)) as s:
        p = prompts(loaded.tokenizer, 0, 1, 32)[0]
        s.generate(p.request_id, p.ids, 4)
        during_run = rss_now()
    return {
        "store": store,
        "cache_experts": cache,
        "model_bytes": spec.model_bytes,
        "rss_before_model": base,
        "rss_after_build": after_build,
        "rss_during_run": during_run,
        "slot_pool_bytes": cache * om.store.row_bytes,
        "peak_rss": peak_rss_bytes(),
        "peak_over_model": peak_rss_bytes() / spec.model_bytes,
        "peak_above_baseline_over_model": (peak_rss_bytes() - base) / spec.model_bytes,
    }


def run_probe(store: str, cache: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-probe", store, str(cache)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    log(
        f"memory ({store} store, cache {cache}): peak RSS {res['peak_rss'] / 2**30:.2f} GiB = {res['peak_over_model']:.2f} x model "
        f"({res['model_bytes'] / 2**30:.2f} GiB); above the interpreter baseline {res['peak_above_baseline_over_model']:.2f} x, "
        f"of which the slot pool (device memory on a GPU) is {res['slot_pool_bytes'] / res['model_bytes']:.2f} x"
    )
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--train-prompts", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cache-experts", type=int, default=12)
    ap.add_argument("--link-gbps", type=float, default=2.0)
    ap.add_argument("--link-latency-us", type=float, default=10.0)
    ap.add_argument("--memory-probe", nargs=2, metavar=("STORE", "CACHE"), help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default=MODEL, help="tiny preset or checkpoint directory")
    ap.add_argument(
        "--only", choices=["all", "overhead"], default="all", help="overhead: part 1 alone"
    )
    ap.add_argument("--threads", type=int, help="torch CPU threads (default 1 on the CPU)")
    args = ap.parse_args(argv)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe[0], int(args.memory_probe[1]))))
        return 0
    t0 = time.perf_counter()
    over, om = overhead(args)
    if args.only == "overhead":
        om.close()
        result = {"model": args.model, "overhead": over, "bench_wall_s": time.perf_counter() - t0}
        print(json.dumps(result, indent=2) if args.json else f"overhead ratio {over['ratio']:.3f}")
        return 0
    link_rows = emulated_link(args, om)
    om.close()
    del om
    memory = [run_probe("file", args.cache_experts), run_probe("ram", 6)]
    result = {
        "model": MODEL,
        "torch_threads": 1,
        "overhead": over,
        "emulated_link": link_rows,
        "memory": memory,
        "bench_wall_s": time.perf_counter() - t0,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"overhead (all experts resident, {MODEL}, CPU): ratio {over['ratio']:.3f} (target <= 1.10), outputs bitwise equal: {over['outputs_bitwise_equal']}"
        )
        for r in link_rows:
            print(
                f"emulated {r['link_gbps']} GB/s link, cache {r['cache_experts_total']}/32: {r['policy']:19s} TPOT {r['tpot_mean_s'] * 1e3:7.1f} ms  TTFT {r['ttft_mean_s']:.3f} s  hit rate {r['hit_rate']:.3f}"
            )
        for m in memory:
            print(
                f"peak RSS, {m['store']} store, cache {m['cache_experts']}: {m['peak_over_model']:.2f} x model size "
                f"({m['peak_above_baseline_over_model']:.2f} x above the interpreter baseline, "
                f"slot pool {m['slot_pool_bytes'] / m['model_bytes']:.2f} x)"
            )
        print(f"benchmark wall time {result['bench_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
