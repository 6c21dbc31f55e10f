"""Entry point: python -m cmal_jax.main --config=configs/pretrain.py --workdir=DIR

Starts jax.distributed when the environment says the job is multi-process,
then runs the job config.task names (jobs.py): 'pretrain'
(configs/pretrain.py) or a downstream task (configs/finetune.py:TASK).

An error that is the user's (an invalid config value, missing or bad data,
a workdir in use, a refused resume, a run gone non-finite: USER_ERRORS)
ends it with one line, `main: error: MESSAGE`, and exit status 1, on every
process that raises it; --verbose shows the traceback instead.
"""

import os
import socket
import sys
import time

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from cmal_jax import cli_errors, jobs, workdir_lock

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Python config file, e.g. configs/pretrain.py:small,cmal',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics '
                               'and evaluation results go.')
flags.mark_flags_as_required(['config', 'workdir'])
_VERBOSE = flags.DEFINE_bool('verbose', False, cli_errors.VERBOSE_HELP)

# Besides bad input and files: another run's lock, and NonFiniteGuard's
# stop, whose message names the steps and the config limit.
USER_ERRORS = cli_errors.USER_ERRORS + (workdir_lock.WorkdirInUse,
                                        FloatingPointError)


_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for a multi-process '
    'job started by hand (default: $JAX_COORDINATOR_ADDRESS). TPU pods and '
    'SLURM are detected without it.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'With --coordinator_address: the number of '
    'processes (default: $JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'With --coordinator_address: this process\'s index '
    '(default: $JAX_PROCESS_ID).')
_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', 300, 'Seconds to wait for the coordinator and the '
    'other processes at start-up.')


def wait_for_coordinator(address, timeout):
  """Returns once a TCP connection to host:port succeeds; exits with a
  message naming the address after `timeout` seconds. (JAX's own timeout
  aborts the process from C++ with a bare DEADLINE_EXCEEDED.)"""
  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        sys.exit(f'FATAL: could not reach the coordinator {address} within '
                 f'{timeout}s (--coordinator_address / '
                 f'JAX_COORDINATOR_ADDRESS): {e}. Is process 0 running, and '
                 'is the port open from this host?')
      time.sleep(0.5)


def maybe_initialize_distributed():
  """jax.distributed for TPU pods, SLURM or an explicit coordinator (flags or
  JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID, which
  JAX does not read itself); nothing for a single process."""
  env = os.environ
  address = _COORDINATOR.value or env.get('JAX_COORDINATOR_ADDRESS')
  timeout = _TIMEOUT.value
  if address:
    # Each value from its flag, else from its environment variable.
    sources = {'num_processes': (_NUM_PROCESSES, 'JAX_NUM_PROCESSES'),
               'process_id': (_PROCESS_ID, 'JAX_PROCESS_ID')}
    given = {}
    for k, (flag, var) in sources.items():
      given[k] = flag.value
      if given[k] is None and var in env:
        given[k] = int(env[var])
    missing = [f'--{k} ({var})' for k, (_, var) in sources.items()
               if given[k] is None]
    if missing:
      sys.exit(f'FATAL: a coordinator ({address}) is given but not '
               f'{" and ".join(missing)}: set the number of processes and '
               'this one\'s index.')
    if not 0 <= given['process_id'] < given['num_processes']:
      sys.exit(f'FATAL: process_id={given["process_id"]} is not in '
               f'[0, num_processes={given["num_processes"]}).')
    if given['process_id'] > 0:
      wait_for_coordinator(address, timeout)
    jax.distributed.initialize(address, initialization_timeout=timeout,
                               **given)
  elif (int(env.get('SLURM_NTASKS', '1')) > 1
        or env.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0):
    # JAX detects the cluster.
    jax.distributed.initialize(initialization_timeout=timeout)


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
  with cli_errors.errors_as_one_line('main', _VERBOSE.value, USER_ERRORS):
    maybe_initialize_distributed()
    jobs.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
