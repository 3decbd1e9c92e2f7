"""UMBRELLA benchmarks: each module prints one JSON line and a table of ratios against a baseline
measured in the same run (see benchmarks/README.md). Run all with ``python -m benchmarks.run_all``."""
