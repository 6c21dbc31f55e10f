"""python -m cmal_jax.export --workdir=runs/pretrain [--step=N|best] --out=DIR"""

from cmal_jax import cli_errors
from cmal_jax.export.export import main

if __name__ == '__main__':
  cli_errors.run_tool('export', main)
