"""Benchmarks: each compares two ways side by side in one process and prints the ratio."""
