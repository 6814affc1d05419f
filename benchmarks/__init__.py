"""Benchmarks of pyro_struct: scripts that print tables and save them under ``benchmarks/results/``.

Run one with ``python -m benchmarks NAME`` (see ``python -m benchmarks --help``).
"""
