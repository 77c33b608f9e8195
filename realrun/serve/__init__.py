"""`fmoe serve`: an OpenAI-compatible HTTP server over the real executor.

Modules, bottom up: ``text`` (a request's answer text: incremental decoding, stop
strings), ``sampling`` (greedy, temperature and top-p choice of the next token),
``engine`` (the engine thread: a bounded queue, continuous batching of packed rows on a
:class:`~realrun.session.RunSession`, cancellation, routing capture), ``metrics``
(Prometheus metrics), ``schemas`` (request validation into OpenAI error objects),
``app`` (the FastAPI routes, server-sent events) and ``server`` (build, run under uvicorn,
graceful shutdown and the capture file). Nothing here is imported by ``fmoe --help``.
"""
