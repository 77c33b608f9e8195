"""Measuring a machine and trusting the simulator: microbenchmarks (bench), fitting a
HardwareProfile from them (fit, piecewise), and validating the simulator against real
runs (validate). It sits above sim/ and realrun/ and is imported only by the CLI and the
scripts on top; the contracts it fits (ModelSpec, HardwareProfile) live in ``specs``.
"""
