"""Throughput and MFU benchmarks (write JSON; not part of the installed package)."""
