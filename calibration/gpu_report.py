"""The GPU check's results (scripts/gpu_check.py ``results.json``) as goals and markdown.

Pure functions of the results dictionary, so the check (its ``summary.md``), the report
script (scripts/gpu_report.py: docs/gpu.md and the measured preset) and the tests share
one reading of it. Goals are issue 24's:

- exactness on CUDA: every CUDA test passed (none skipped on a GPU) and the overhead
  run's outputs equal the unmodified model's bit for bit;
- simulator error per validation cell: TPOT <= 5 %, TTFT <= 10 % (each cell's mean
  against the measured mean), hit rate <= 0.01 absolute;
- executor overhead at full residency <= 10 % of the unmodified model's decode step;
- the profile holds measured H2D bandwidth and expert FFN times with their spread.

A dry run (``--device cpu``) reports the same tables, marked as such: nothing in it was
measured on a GPU.
"""

from __future__ import annotations

from typing import Any

CELL_TARGETS = {"tpot_mean_ape": 0.05, "ttft_mean_ape": 0.10, "hit_rate_abs_error": 0.01}
OVERHEAD_TARGET = 1.10


def _ok(value: float | None, target: float) -> bool | None:
    return None if value is None else bool(value <= target)


def cells(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per policy x cache cell: measured and simulated figures, errors, goals met."""
    val = results.get("validate") or {}
    rows = []
    for r in val.get("runs", []):
        row = {
            "policy": r["policy"],
            "cache_experts": r["cache_experts"],
            **{k: r.get(k) for k in ("real_ttft_mean_s", "sim_ttft_mean_s", "real_tpot_mean_s",
                                     "sim_tpot_mean_s", "real_hit_rate", "sim_hit_rate")},
            **{k: r.get(k) for k in CELL_TARGETS},
            "real_tpot_mean_spread": r.get("real_tpot_mean_spread"),
        }  # fmt: skip
        row["met"] = all(_ok(r.get(k), t) for k, t in CELL_TARGETS.items())
        rows.append(row)
    return rows


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """Each goal: its figure(s) and whether met (None: not measured in this run)."""
    t = results.get("cuda_tests")
    on_gpu = not results.get("dry_run", True)
    if t is None:
        tests_ok = None
    else:
        clean = t["failures"] == 0 and t["errors"] == 0 and t["tests"] > 0
        tests_ok = clean and (t["skipped"] == 0 if on_gpu else True)
    over = results.get("overhead") or {}
    rows = cells(results)
    bench = results.get("bench") or {}
    meas = bench.get("measurements") or {}
    return {
        "cuda_tests_pass": tests_ok,
        "overhead_outputs_bitwise_equal": over.get("outputs_bitwise_equal"),
        "cells_meeting_targets": f"{sum(r['met'] for r in rows)}/{len(rows)}" if rows else None,
        "all_cells_meet_targets": all(r["met"] for r in rows) if rows else None,
        "overhead_decode_step_ratio": over.get("decode_step_ratio"),
        "overhead_met": _ok(over.get("decode_step_ratio"), OVERHEAD_TARGET),
        "profile_has_link_spread": bench.get("link_spread_median") is not None if bench else None,
        "profile_has_expert_shapes": bool(meas.get("expert_shapes")) if bench else None,
        "measured_on_gpu": on_gpu,
    }


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if unit == "ms":
            return f"{v * 1e3:.3g}"
        if unit == "%":
            return f"{v * 100:.1f}"
        return f"{v:.4g}"
    return str(v)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def link_table(bench: dict[str, Any]) -> str:
    """Copy time and bandwidth per size on device 0: raw pinned and pageable copies, and
    expert rows through the executor's copy engine (``path='engine'``, CUDA only)."""
    link = [s for s in (bench.get("measurements") or {}).get("link", []) if s.get("device", 0) == 0]
    kinds = {"pinned": lambda s: s.get("path", "raw") == "raw" and s.get("pinned", True),
             "pageable": lambda s: s.get("path", "raw") == "raw" and not s.get("pinned", True),
             "engine": lambda s: s.get("path") == "engine"}  # fmt: skip
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    for s in link:
        for kind, test in kinds.items():
            if test(s):
                by_size.setdefault(s["nbytes"], {})[kind] = s
    rows = []
    for n in sorted(by_size):
        cols = [f"{n:,}"]
        for kind in kinds:
            s = by_size[n].get(kind)
            if s is None:
                cols += ["-", "-", "-"]
                continue
            cols += [f"{s['seconds'] * 1e6:.1f}", f"{n / s['seconds'] / 1e9:.2f}",
                     _fmt(s.get("spread"), "%")]  # fmt: skip
        rows.append(cols)
    head = ["bytes"]
    for kind in kinds:
        head += [f"{kind} us", f"{kind} GB/s", "spread %"]
    return table(head, rows)


def shapes_table(bench: dict[str, Any]) -> str:
    """Expert FFN time per routed expert against tokens, one column per real shape."""
    shapes = (bench.get("measurements") or {}).get("expert_shapes", [])
    models = list(dict.fromkeys(s["model"] for s in shapes))
    tokens = sorted({s["tokens"] for s in shapes})
    at = {(s["model"], s["tokens"]): s for s in shapes}
    head = ["tokens"] + [
        f"{m} ({at[(m, tokens[0])]['hidden']}x{at[(m, tokens[0])]['intermediate']}) us (spread %)"
        for m in models
    ]
    rows = []
    for n in tokens:
        cols = [str(n)]
        for m in models:
            s = at.get((m, n))
            cols.append(
                "-" if s is None else f"{s['seconds'] * 1e6:.1f} ({_fmt(s['spread'], '%')})"
            )
        rows.append(cols)
    return table(head, rows)


def cells_table(results: dict[str, Any]) -> str:
    rows = [
        [r["policy"], str(r["cache_experts"]), _fmt(r["real_ttft_mean_s"], "ms"),
         _fmt(r["sim_ttft_mean_s"], "ms"), _fmt(r["ttft_mean_ape"], "%"),
         _fmt(r["real_tpot_mean_s"], "ms"), _fmt(r["sim_tpot_mean_s"], "ms"),
         _fmt(r["tpot_mean_ape"], "%"), _fmt(r["real_tpot_mean_spread"], "%"),
         _fmt(r["real_hit_rate"]), _fmt(r["sim_hit_rate"]), _fmt(r["hit_rate_abs_error"]),
         _fmt(r["met"])]
        for r in cells(results)
    ]  # fmt: skip
    return table(
        ["policy", "cache", "TTFT real ms", "sim ms", "err %", "TPOT real ms", "sim ms",
         "err %", "real spread %", "hit real", "sim", "abs err", "met"],
        rows,
    )  # fmt: skip


def render_summary(results: dict[str, Any]) -> str:
    """The whole run as markdown (what gpu_check writes to ``summary.md``)."""
    env = results.get("env") or {}
    g = goals(results)
    out = [
        f"# GPU check ({'dry run on the CPU: nothing here was measured on a GPU' if results.get('dry_run') else 'measured on ' + str(env.get('gpu_name'))})",
        "",
    ]
    out.append(
        f"Started {results.get('started_utc')}, {results.get('wall_s')} s of a "
        f"{results.get('budget_s')} s budget. Python {env.get('python')}, torch "
        f"{env.get('torch')} (CUDA {env.get('torch_cuda')}), transformers "
        f"{env.get('transformers')}, commit {env.get('commit')}."
    )
    if env.get("nvidia_smi"):
        out.append(f"nvidia-smi: {env['nvidia_smi']}")
    out += ["", "## Stages", ""]
    out.append(table(
        ["stage", "status", "wall s", "limit s"],
        [[n, s.get("status", "-"), _fmt(s.get("wall_s")), _fmt(s.get("timeout_s"))]
         for n, s in results.get("stages", {}).items()],
    ))  # fmt: skip
    out += ["", "## Goals", "", table(["goal", "value"], [[k, _fmt(v)] for k, v in g.items()])]
    t = results.get("cuda_tests")
    if t:
        out += ["", "## CUDA tests", "",
                f"{t['tests']} tests: {t['passed']} passed, {t['failures']} failed, "
                f"{t['errors']} errors, {t['skipped']} skipped."]  # fmt: skip
        out += [f"- `{f['test']}`: {f['message']}" for f in t["failing"]]
    ck = results.get("checkpoint")
    if ck:
        out += ["", f"Model of bench, validate and overhead: `{ck['name']}` (random weights, "
                f"{ck['layers']} MoE layers shaped like {ck['like']}, vocabulary {ck.get('vocab')}, "
                f"{ck.get('dtype')})."]  # fmt: skip
    bench = results.get("bench")
    if bench:
        out += ["", "## Bench", "",
                f"Link fit: {bench['link_bandwidth_Bps'] / 1e9:.2f} GB/s pinned, latency "
                f"{bench['link_latency_s'] * 1e6:.1f} us (median spread of repeats "
                f"{_fmt(bench.get('link_spread_median'), '%')} %); expert 1 token "
                f"{_fmt(bench.get('expert_1_token_s'), 'ms')} ms; dense decode layer "
                f"{_fmt(bench.get('dense_decode_s'), 'ms')} ms; copy interference "
                f"{_fmt(bench.get('copy_interference'))}; executor overhead per layer "
                f"{_fmt(bench.get('layer_overhead_s'), 'ms')} ms.", "",
                link_table(bench), "", shapes_table(bench), "",
                table(["fit", "MAPE %"], [[k, _fmt(v, "%")] for k, v in bench["fit_errors"].items()])]  # fmt: skip
    if results.get("validate"):
        s = results["validate"].get("summary") or {}
        out += ["", "## Simulator against the real executor", "",
                f"{s.get('runs')} cells, {s.get('requests')} requests; per-request MAPE: TTFT "
                f"{_fmt(s.get('ttft_mape'), '%')} %, TPOT {_fmt(s.get('tpot_mape'), '%')} %; hit "
                f"rate abs error max {_fmt(s.get('hit_rate_abs_error_max'))}; compute slowdown "
                f"vs the profile {_fmt(s.get('compute_slowdown_median'))}.", "",
                cells_table(results)]  # fmt: skip
    over = results.get("overhead")
    if over:
        out += ["", "## Executor overhead, every expert resident", "",
                f"Decode step {_fmt(over.get('decode_step_ratio'))} x the unmodified model's "
                f"(whole runs {_fmt(over.get('ratio'))} x; {over.get('dtype')}, {over.get('device')}); "
                f"outputs bit-equal: {_fmt(over.get('outputs_bitwise_equal'))}."]  # fmt: skip
    return "\n".join(out) + "\n"
