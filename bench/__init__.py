"""Benchmarks: `python -m bench {train,generate} --model tiny|sd15`; results go to BENCHMARKS.md."""
