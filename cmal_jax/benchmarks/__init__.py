"""Benchmarks: `python -m cmal_jax.benchmarks` measures the machine's matmul
peak, the pre-training step in JAX and in the PyTorch mirror, CMAP's cost,
the input pipeline and compile times, side by side in one run, and writes
BENCHMARKS.md and BENCHMARKS.json (see run.py)."""
