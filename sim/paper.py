"""The fMoE paper's experiments, reproduced in simulation.

Everything here is a thin layer over :func:`sim.sweep.run_sweep`: it fixes the paper's
setup (Mixtral-8x7B on the 6 x RTX 3090 testbed, LMSYS-Chat-like and ShareGPT-like
workloads, 70% of requests fill the stores and 30% are measured), runs the policies and
turns the rows into the paper's tables. The workloads are synthetic (``traces.synth``,
shaped like the paper's by their mean prompt/output lengths and given semantic
structure); the hardware figures are published ones (``paper-6x3090``), not measured.

This module gathers the public names of its three parts: :mod:`sim.paper_setup` (setup,
workloads, policy runs, reductions), :mod:`sim.paper_studies` (the paper's studies) and
:mod:`sim.paper_quality` (the issue's quality table).
"""

from __future__ import annotations

from sim.paper_quality import (
    QUALITY_MIN_GAIN,
    QUALITY_VARIANTS,
    quality_checks,
    quality_table,
    run_quality,
)
from sim.paper_setup import (
    BASELINES,
    BOUNDS,
    DEMO_POLICIES,
    PAPER_CACHE_GB,
    PAPER_HIT_RATE_GAIN,
    PAPER_TPOT_REDUCTION,
    PAPER_TTFT_REDUCTION,
    WORKLOADS,
    PaperSetup,
    base_config,
    paper_workload,
    policy_table,
    reductions,
    run_policies,
    save_csv,
    scaled_cache_gb,
    workloads_for,
)
from sim.paper_studies import (
    ABLATION_CACHING,
    ABLATION_LOOKAHEAD,
    ABLATION_PREDICTION,
    ABLATION_PREFETCH,
    STUDY_POLICIES,
    run_variants,
    study_ablation,
    study_batch_size,
    study_cache_limit,
    study_online,
    study_prefetch_distance,
    study_store_capacity,
)

__all__ = [
    "ABLATION_CACHING",
    "ABLATION_LOOKAHEAD",
    "ABLATION_PREDICTION",
    "ABLATION_PREFETCH",
    "BASELINES",
    "BOUNDS",
    "DEMO_POLICIES",
    "PAPER_CACHE_GB",
    "PAPER_HIT_RATE_GAIN",
    "PAPER_TPOT_REDUCTION",
    "PAPER_TTFT_REDUCTION",
    "QUALITY_MIN_GAIN",
    "QUALITY_VARIANTS",
    "STUDY_POLICIES",
    "WORKLOADS",
    "PaperSetup",
    "base_config",
    "paper_workload",
    "policy_table",
    "quality_checks",
    "quality_table",
    "reductions",
    "run_policies",
    "run_quality",
    "run_variants",
    "save_csv",
    "scaled_cache_gb",
    "study_ablation",
    "study_batch_size",
    "study_cache_limit",
    "study_online",
    "study_prefetch_distance",
    "study_store_capacity",
    "workloads_for",
]
