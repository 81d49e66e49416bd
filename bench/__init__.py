"""Benchmarks: measurements printed as tables, never timed asserts (see DESIGN.md)."""
