"""The real executor: offloaded experts inside transformers MoE models.

Modules, bottom up: ``models`` (load a tiny preset or a checkpoint; find MoE blocks),
``layout``/``store`` (packed experts in host RAM or a safetensors file), ``copy_engine``
(copy thread, priority queue, chunked preemption, link emulation; CPU and CUDA movers),
``residency`` (ExpertCache + slot pools + engines, the simulator's prefetch semantics),
``offload`` (the experts stand-in and the exact slot-view compute), ``taps`` (routing
hooks), ``drivers`` (sync / searcher-thread policy calls), ``session`` (one policy run),
``generate`` (static batches, padding, the shared timed iteration step), ``continuous``
(continuous batching of packed rows), ``serving`` (either batching over a prompt list),
``metrics``/``recorder``, ``runner`` (`fmoe run`), ``capture`` (`fmoe trace capture`) and
``api`` (:func:`realrun.api.offload`: offloaded experts under the library's own ``generate``)
and ``serve`` (`fmoe serve`: an OpenAI-compatible HTTP server on continuous batching).
"""
