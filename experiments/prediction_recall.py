"""How well each kind of predictor names a token's experts, timing aside: the recall of the
actual top-K among each predictor's top-K, for the measured (30%) requests' decode tokens.

    python experiments/prediction_recall.py [--num-requests 20] [--workload lmsys] [--seed 0]
                                            [--knob name=json ...]

Predictors (fMoE's against the coarser information the baselines use):
- sem: the stored map whose embedding is nearest the token's (fMoE step 1);
- traj: the stored map whose prefix of layers 0..l-d best matches the token's own
  (fMoE step 2, d = 3), which is what fMoE knows d layers ahead (sem for l < d);
- request: the request's own expert counts over its earlier tokens (request-level
  tracking, MoE-Infinity's activation matrix before matching);
- eam-match: the stored training request whose activation matrix best matches the
  request's so far (MoE-Infinity's prediction);
- previous: the previous token's gate row at that layer (temporal locality);
- popularity: the training set's most used experts per layer.
Random guessing scores K/J. The store is filled with the training (70%) requests'
tokens, as in the offline setup. ``--knob`` overrides a generator default (e.g.
``--knob popularity_skew=1.0``) to compare workloads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from policies.expert_map_store import ExpertMapStore, unit_rows  # noqa: E402
from sim.paper import paper_workload  # noqa: E402
from specs.presets import load_model  # noqa: E402
from traces.types import Workload  # noqa: E402

GROUPS = {"layers 0-2": range(0, 3), "layers 3-15": range(3, 16), "layers 16-31": range(16, 32)}


def _cat(w: Workload, field: str) -> np.ndarray:
    return np.concatenate([getattr(r.routing, field) for r in w.requests])


def recall_table(
    workload: Workload, distance: int = 3, sample: float = 0.5, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per predictor, the mean recall per layer [L] over a ``sample`` of decode tokens."""
    spec = workload.spec
    L, J, K = spec.num_moe_layers, spec.num_experts, spec.top_k
    train, test = workload.split(0.7, seed)
    store = ExpertMapStore(1000, L, J, distance)
    store.add_batch(_cat(train, "gate_probs"), _cat(train, "embeddings"))
    S = store.stored_maps()
    flat = S.reshape(len(S), -1)
    prefix_norm = np.sqrt(np.cumsum((S**2).sum(axis=2), axis=1))  # [C, L]
    ids_train = _cat(train, "topk_ids").astype(np.int64)
    pop = np.stack([np.bincount(ids_train[:, lay].ravel(), minlength=J) for lay in range(L)])
    offs = (np.arange(L) * J)[None, :, None]
    eam = np.stack(
        [
            np.bincount((r.routing.topk_ids.astype(np.int64) + offs).ravel(), minlength=L * J)
            for r in train.requests
        ]
    ).astype(float)
    eam_norm = np.linalg.norm(eam, axis=1)
    hits: dict[str, np.ndarray] = {}
    count = np.zeros(L)
    rng = np.random.default_rng(seed)

    def add(name: str, lay: int, scores: np.ndarray, actual: np.ndarray) -> None:
        top = np.argsort(-scores, kind="stable")[:K]
        hits.setdefault(name, np.zeros(L))[lay] += len(set(top.tolist()) & set(actual.tolist()))

    for r in test.requests:
        ids = r.routing.topk_ids.astype(np.int64)
        gp, emb = r.routing.gate_probs, r.routing.embeddings
        counts = np.zeros((L, J))
        for t in range(len(ids)):
            if t >= r.prompt_len and rng.random() < sample:  # a decode token
                sem = int(np.argmax(store.emb[: store.size] @ unit_rows(emb[t : t + 1])[0]))
                q = counts.ravel()
                match = int(np.argmax(eam @ q / (eam_norm * np.linalg.norm(q) + 1e-12)))
                for lay in range(L):
                    act = ids[t, lay]
                    count[lay] += 1
                    add("sem", lay, S[sem, lay], act)
                    if lay >= distance:
                        m = lay - distance + 1  # layers 0..lay-d observed
                        cos = (flat[:, : m * J] @ gp[t, :m].ravel()) / prefix_norm[:, m - 1]
                        add("traj", lay, S[int(np.argmax(cos)), lay], act)
                    else:
                        add("traj", lay, S[sem, lay], act)
                    add("request", lay, counts[lay], act)
                    add("eam-match", lay, eam[match].reshape(L, J)[lay], act)
                    add("previous", lay, gp[t - 1, lay], act)
                    add("popularity", lay, pop[lay].astype(float), act)
            counts[np.arange(L)[:, None], ids[t]] += 1
    return {k: v / np.maximum(count, 1) / K for k, v in hits.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-requests", type=int, default=20)
    p.add_argument("--workload", default="lmsys", choices=["lmsys", "sharegpt"])
    p.add_argument("--model", default="mixtral-8x7b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--knob", action="append", default=[], help="generator override name=json")
    a = p.parse_args()
    knobs = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.knob)}
    spec = load_model(a.model)
    w = paper_workload(a.workload, spec, a.num_requests, a.seed, **knobs)
    table = recall_table(w, seed=a.seed)
    names = list(table)
    print(f"recall of the actual top-{spec.top_k} (random: {spec.top_k / spec.num_experts:.3f})")
    print("layers        " + " ".join(f"{n:>10s}" for n in names))
    for g, rows in {**GROUPS, "all": range(spec.num_moe_layers)}.items():
        rows = [i for i in rows if i < spec.num_moe_layers]
        print(f"{g:13s} " + " ".join(f"{table[n][rows].mean():10.3f}" for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
