"""Benchmarks: scripts that measure and write their tables and plots under docs/."""
