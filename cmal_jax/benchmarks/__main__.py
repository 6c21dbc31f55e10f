from cmal_jax import cli_errors
from cmal_jax.benchmarks.run import main

if __name__ == '__main__':
  cli_errors.run_tool('benchmarks', main)
