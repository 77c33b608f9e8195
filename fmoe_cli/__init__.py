"""The thin `fmoe` command line: one module per command group, each calling a package's
public functions."""
