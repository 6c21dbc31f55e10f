"""python -m cmal_jax.convert: see cli.py."""

from cmal_jax import cli_errors
from cmal_jax.convert.cli import main

if __name__ == "__main__":
  cli_errors.run_tool('convert', main)
