"""Entry point: python -m cmal_jax.main --config=configs/pretrain.py --workdir=DIR

Starts jax.distributed when the environment says the job is multi-process,
then dispatches on config.task.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Python config file, e.g. configs/pretrain.py:small,cmal',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics '
                               'and evaluation results go.')
flags.mark_flags_as_required(['config', 'workdir'])


def maybe_initialize_distributed():
  """jax.distributed for TPU pods, SLURM or explicit coordinator variables."""
  import jax
  multi = (os.environ.get('JAX_COORDINATOR_ADDRESS')
           or int(os.environ.get('SLURM_NTASKS', '1')) > 1
           or os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0)
  if multi:
    jax.distributed.initialize()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO.
  maybe_initialize_distributed()
  config = _CONFIG.value
  if config.task == 'pretrain':
    from cmal_jax import train
    train.train_and_evaluate(config, _WORKDIR.value)
  else:
    raise ValueError(f"config.task={config.task!r}: unknown task; known: "
                     "'pretrain'.")


if __name__ == '__main__':
  app.run(main)
