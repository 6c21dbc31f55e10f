"""Entry point: python -m cmal_jax.main --config=configs/pretrain.py --workdir=DIR

Starts jax.distributed when the environment says the job is multi-process,
then trains: config.task is 'pretrain' (configs/pretrain.py) or a
downstream task (configs/finetune.py:TASK).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Python config file, e.g. configs/pretrain.py:small,cmal',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics '
                               'and evaluation results go.')
flags.mark_flags_as_required(['config', 'workdir'])


def maybe_initialize_distributed():
  """jax.distributed for TPU pods, SLURM or explicit coordinator variables
  (JAX_COORDINATOR_ADDRESS=host:port with JAX_NUM_PROCESSES and
  JAX_PROCESS_ID, which JAX does not read itself)."""
  import jax
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    missing = [k for k in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')
               if k not in env]
    if missing:
      sys.exit(f'JAX_COORDINATOR_ADDRESS is set but {" and ".join(missing)} '
               'not: set both (the number of processes, this one\'s index).')
    jax.distributed.initialize(num_processes=int(env['JAX_NUM_PROCESSES']),
                               process_id=int(env['JAX_PROCESS_ID']))
  elif (int(env.get('SLURM_NTASKS', '1')) > 1
        or env.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0):
    jax.distributed.initialize()  # JAX detects the cluster.


def parse_flags(argv):
  """absl's flag parsing, except that an override naming no config field
  (ml_collections raises an AttributeError or KeyError from inside absl)
  gets a one-line message like absl's own flag errors, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    errors = []  # The KeyError chain, outermost first; the last is the key.
    cause = e if isinstance(e, KeyError) else e.__context__
    while isinstance(cause, KeyError):
      errors.append(str(cause.args[0]))
      cause = cause.__context__
    if not errors:
      raise
    key = errors[-1]
    hint = errors[0].partition('\n')[2] if len(errors) > 1 else ''
    flag = next((a.split('=')[0] for a in argv
                 if a.startswith('--config.') and key in a.split('=')[0]
                 .split('.')), '--config')
    sys.exit(f'FATAL Flags parsing error: {flag}: the config has no field '
             f'{key!r}. {hint}'.rstrip())


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO.
  maybe_initialize_distributed()
  config = _CONFIG.value
  from cmal_jax import train  # Pre-training and every fine-tuning task.
  train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
