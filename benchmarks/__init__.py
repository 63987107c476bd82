"""meshca benchmarks: `python -m benchmarks.run [--full] [--only NAME]` (see docs/performance.md)."""
