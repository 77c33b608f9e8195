"""`fmoe trace capture`: run a real model and write what it routed in the traces/ format.

The unmodified model runs greedily on each prompt with routing taps installed: the
experts the model actually chose (a forward pre-hook on each ``experts`` module, so
group-limited sigmoid routers are recorded as chosen), their weights, the full
probability rows, lookahead rows and the per-token embeddings. The resulting workload
drives the simulator (``fmoe sim --trace``). ``fmoe run --trace-out`` writes the same
format from an offloaded run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibration.errors import InputError
from calibration.model_spec import ModelSpec
from realrun.generate import greedy_generate
from realrun.recorder import RoutingRecorder
from realrun.taps import ModelTaps


def make_workload(
    spec: ModelSpec, requests: list, seed: int, source: str, extra: dict[str, Any] | None = None
) -> Any:
    """A traces Workload with provenance (source, model, software versions, seed)."""
    import transformers

    from traces.types import Workload

    prov = {
        "source": source,
        "model": spec.name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": seed,
        **(extra or {}),
    }
    return Workload(spec, requests, prov)


def write_workload(workload: Any, path: str | Path) -> None:
    from traces.io import save_workload

    save_workload(workload, path)


@dataclass
class CaptureConfig:
    model: str
    out: str
    prompts: str | None = "mt-bench"
    prompt_texts: list[str] | None = None
    num_prompts: int = 8
    max_new_tokens: int = 16
    max_prompt_tokens: int = 128
    seed: int = 0


class _CaptureObserver:
    """Feeds the recorder from the taps of an unmodified model."""

    def __init__(self, taps: ModelTaps, recorder: RoutingRecorder) -> None:
        self.taps = taps
        self.rec = recorder
        taps.on_embeddings = lambda out: recorder.embeddings(
            out.detach().reshape(-1, out.shape[-1]).float().cpu().numpy()
        )
        taps.on_gate = self._gate

    def _gate(
        self, layer: int, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
    ) -> None:
        self.rec.gate(
            layer,
            idx.detach().cpu().numpy(),
            weights.detach().float().cpu().numpy(),
            self.taps.probs(layer),
            self.taps.lookahead(layer, hidden),
        )

    def begin_iteration(self, positions: np.ndarray, prefill: bool) -> None:
        self.rec.start_iteration()

    def end_iteration(self, last: bool) -> None:
        """Nothing to do: rows were recorded during the forward."""


def capture(cfg: CaptureConfig, progress=lambda msg: sys.stderr.write(msg + "\n")) -> Any:
    """Run the prompts on the unmodified model and write the workload to ``cfg.out``."""
    from realrun.models import load, resolve_model
    from realrun.prompting import check_lengths, encode, prompt_texts

    _, hf_config, _ = resolve_model(cfg.model)
    max_prompt = check_lengths(hf_config, cfg.max_prompt_tokens, cfg.max_new_tokens)
    texts = prompt_texts(cfg.prompts, cfg.prompt_texts, cfg.num_prompts)
    out = Path(cfg.out)
    if not out.parent.is_dir():
        raise InputError(f"--out {cfg.out}: directory {out.parent} does not exist")
    loaded = load(cfg.model, seed=cfg.seed)
    recorder = RoutingRecorder(loaded.spec, lookahead=True)
    taps = ModelTaps(loaded).install(experts_prehook=True)
    try:
        obs = _CaptureObserver(taps, recorder)
        for i, p in enumerate(encode(loaded.tokenizer, texts, max_prompt)):
            recorder.start_request(p.request_id, len(p.ids), p.text)
            g = greedy_generate(loaded.model, p.request_id, p.ids, cfg.max_new_tokens, observer=obs)
            recorder.finish_request(len(g.output_ids))
            progress(
                f"[{i + 1}/{len(texts)}] {p.request_id}: {len(p.ids)} + {len(g.output_ids)} tokens"
            )
    finally:
        taps.remove()
    workload = make_workload(
        loaded.spec,
        recorder.requests,
        cfg.seed,
        source="realrun.capture",
        extra={
            "prompts": cfg.prompts if not cfg.prompt_texts else "explicit",
            "tokenizer": getattr(loaded.tokenizer, "name", "unknown"),
            "max_new_tokens": cfg.max_new_tokens,
            "executor": "unmodified model, eager experts",
        },
    )
    write_workload(workload, out)
    return workload


def register_capture(trace_subparsers: argparse._SubParsersAction) -> None:
    """Add `fmoe trace capture` to the `fmoe trace` group."""
    from fmoe_cli.common import add_json_flag, add_prompt_flags

    p = trace_subparsers.add_parser(
        "capture", help="run a real MoE model and write its routing trace"
    )
    p.add_argument("--model", required=True, help="tiny preset name or local checkpoint directory")
    p.add_argument("--out", required=True, help="trace file to write (traces/ format)")
    add_prompt_flags(p, num_prompts=8)
    p.add_argument(
        "--seed", type=int, default=0, help="torch seed of a tiny preset's random weights"
    )
    add_json_flag(p)
    p.set_defaults(func=_cmd_capture)


def _cmd_capture(args: argparse.Namespace) -> int:
    from fmoe_cli.common import print_json

    cfg = CaptureConfig(
        model=args.model,
        out=args.out,
        prompts=args.prompts,
        prompt_texts=args.prompt_texts,
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        seed=args.seed,
    )
    w = capture(cfg)
    info = {"path": args.out, **w.info()}
    if args.json:
        print_json(info)
    else:
        print(
            f"wrote {args.out}: {info['requests']} requests, {info['tokens']} tokens, {info['layers']} MoE layers"
        )
    return 0
