"""`fmoe trace capture`: run a real model and write what it routed in the traces/ format.

The unmodified model runs greedily on the prompts (``--batch-size`` at a time, as static
batches, see realrun.generate, whose pad rows are never recorded; or with ``--batching
continuous``, see realrun.continuous) with routing taps installed: the
experts the model actually chose (a forward pre-hook on each ``experts`` module, so
group-limited sigmoid routers are recorded as chosen), their weights, the full
probability rows, lookahead rows and the per-token embeddings. The resulting workload
drives the simulator (``fmoe sim --trace``). ``fmoe run --trace-out`` writes the same
format from an offloaded run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from realrun.generate import Generation, IterationRows
from realrun.prompting import Prompt
from realrun.recorder import RoutingRecorder
from realrun.serving import check_batching, generate_all
from realrun.taps import ModelTaps
from specs.errors import InputError
from specs.model_spec import ModelSpec


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
    batch_size: int = 1
    batching: str = "static"  # or "continuous" (realrun.serving)
    output_lens: str = "fixed"  # or "reference" (realrun.output_lens)
    provenance: dict[str, Any] | None = None  # more provenance (e.g. how a model was trained)
    temperature: float = 0.0  # 0: greedy; > 0: sampled (see sample_tokens)


class _CaptureObserver:
    """Feeds the recorder from the taps of an unmodified model."""

    def __init__(self, taps: ModelTaps, recorder: RoutingRecorder) -> None:
        self.taps = taps
        self.rec = recorder
        self._rows: IterationRows | None = None
        taps.on_embeddings = self._embeddings
        taps.on_gate = self._gate

    def _gate(
        self, layer: int, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
    ) -> None:
        rows = self._rows
        assert rows is not None
        probs = self.taps.probs(layer)
        if rows.real is not None:  # real rows only: the trace has no pad rows
            real = rows.real.cpu().numpy()
            probs = probs[real] if probs is not None else None
        self.rec.gate(
            layer,
            rows.select(idx.detach()).cpu().numpy(),
            rows.select(weights.detach()).float().cpu().numpy(),
            probs,
            self.taps.lookahead(layer, rows.select(hidden)),
        )

    def _embeddings(self, out: torch.Tensor) -> None:
        assert self._rows is not None
        flat = self._rows.select(out.detach().reshape(-1, out.shape[-1]))
        self.rec.embeddings(flat.float().cpu().numpy())

    def begin_iteration(self, rows: IterationRows) -> None:
        self._rows = rows
        self.rec.start_iteration(rows.request_ids)

    def end_iteration(self, finished: tuple[str, ...]) -> None:
        """Nothing to do: rows were recorded during the forward."""


def sample_tokens(model: torch.nn.Module, temperature: float, seed: int) -> Any:
    """Make the greedy generation loop sample at ``temperature`` (a removable hook).

    The Gumbel-max trick: argmax(logits + T * g), g ~ Gumbel(0, 1) drawn from a generator
    seeded with ``seed``, is a draw from softmax(logits / T). The noise is added to the
    output layer's result only, so routing, router rows and embeddings are the model's
    own; only which token comes next changes. A small model decoded greedily repeats
    itself, which makes its decode routing repeat too.
    """
    if not temperature > 0:
        raise InputError(f"temperature must be > 0 to sample, got {temperature}")
    head = model.get_output_embeddings()
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def add_noise(_mod: torch.nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        u = torch.rand(out.shape, generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
        g = -torch.log(-torch.log(u))
        return out + (temperature * g).to(out.dtype).to(out.device)

    return head.register_forward_hook(add_noise)


def capture(cfg: CaptureConfig, progress=lambda msg: sys.stderr.write(msg + "\n")) -> Any:
    """Run the prompts on the unmodified model under ``cfg.batching`` with
    ``cfg.batch_size`` (realrun.serving), and write the workload to ``cfg.out``."""
    from realrun.models import load, resolve_model
    from realrun.output_lens import check_output_lens, new_token_limits
    from realrun.prompting import check_lengths, encode, prompt_texts

    if cfg.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    check_batching(cfg.batching)
    _, hf_config, _ = resolve_model(cfg.model)
    max_prompt = check_lengths(hf_config, cfg.max_prompt_tokens, cfg.max_new_tokens)
    texts = prompt_texts(cfg.prompts, cfg.prompt_texts, cfg.num_prompts)
    check_output_lens(cfg.output_lens, texts, explicit=bool(cfg.prompt_texts))
    out = Path(cfg.out)
    if not out.parent.is_dir():
        raise InputError(f"--out {cfg.out}: directory {out.parent} does not exist")
    loaded = load(cfg.model, seed=cfg.seed)
    recorder = RoutingRecorder(loaded.spec, lookahead=True)
    taps = ModelTaps(loaded).install(experts_prehook=True)
    sampler = sample_tokens(loaded.model, cfg.temperature, cfg.seed) if cfg.temperature else None
    try:
        obs = _CaptureObserver(taps, recorder)
        experts = [b.experts for b in loaded.blocks]
        encoded = encode(loaded.tokenizer, texts, max_prompt)
        limits = new_token_limits(loaded.tokenizer, texts, cfg.output_lens, cfg.max_new_tokens)
        done = [0]

        def admit(group: list[Prompt]) -> None:
            for p in group:
                recorder.start_request(p.request_id, len(p.ids), p.text)

        def finish(p: Prompt, g: Generation) -> None:
            recorder.finish_request(g.request_id, len(g.output_ids))
            done[0] += 1
            progress(
                f"[{done[0]}/{len(texts)}] {p.request_id}: {len(p.ids)} + {len(g.output_ids)} tokens"
            )

        generate_all(
            loaded.model,
            encoded,
            limits,
            cfg.batch_size,
            cfg.batching,
            experts=experts,
            observer=obs,
            on_admit=admit,
            on_done=finish,
        )
    finally:
        taps.remove()
        if sampler is not None:
            sampler.remove()
    workload = make_workload(
        loaded.spec,
        recorder.requests,
        cfg.seed,
        source="realrun.capture",
        extra={
            "prompts": cfg.prompts if not cfg.prompt_texts else "explicit",
            "tokenizer": getattr(loaded.tokenizer, "name", "unknown"),
            "max_new_tokens": cfg.max_new_tokens,
            "output_lens": cfg.output_lens,
            "batch_size": cfg.batch_size,
            "batching": cfg.batching,
            "executor": "unmodified model, eager experts",
            "decoding": f"sampled, temperature {cfg.temperature}" if cfg.temperature else "greedy",
            **(cfg.provenance or {}),
        },
    )
    write_workload(workload, out)
    return workload
