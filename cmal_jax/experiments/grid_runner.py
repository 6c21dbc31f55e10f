"""Running the data-efficiency grid's runs (data_efficiency.py): their
synthetic data, one run in this process or N at a time in worker processes
(one GPU each), and --commit's git commits of the result JSONs."""

import concurrent.futures
import json
import multiprocessing
import os
import queue
import shutil
import subprocess
import time

import jax

from cmal_jax import finetune, jobs, storage
from cmal_jax.experiments.grid_plan import result_path, run_config, summarise
from cmal_jax.world import synthetic


def prepare_data(config):
  """Generates the synthetic data a run's config reads where it is missing:
  a (seed, corpus) or (seed, task) folder, shared by every recipe that reads
  the same inputs (region features, or pixels: data_folder)."""
  # Both refuse a pixel run on a folder without images
  # (synthetic.check_images).
  if config.task == 'pretrain':
    synthetic.ensure_world_data(config, config.data.dir)
  else:
    finetune.ensure_task_data(config, config.data.dir)


def execute(run, args, out):
  """Runs `run` in this process (resuming its workdir) and writes its
  result JSON; returns the summary."""
  if not jax.config.jax_compilation_cache_dir:
    # Runs of one seed and kind compile the same programs: the second one
    # loads them (corpus sizes and recipes of a kind share shapes).
    jax.config.update('jax_compilation_cache_dir',
                      os.path.join(out, 'xla_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  config = run_config(run, args, out)
  prepare_data(config)  # Normally done by run_grid already.
  workdir = os.path.join(out, 'runs', run.name)
  t = time.time()
  results = jobs.train_and_evaluate(config, workdir)
  summary = summarise(run, results, time.time() - t)
  path = result_path(out, run)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Atomic: a result is whole or absent, so resuming can trust it.
  storage.write_text_atomic(path, json.dumps(summary, indent=1))
  if args.delete_checkpoints and run.kind == 'finetune':
    shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
  return summary


def _git(folder, *args):
  return subprocess.run(['git', *args], cwd=folder, check=True,
                        capture_output=True, text=True)


def commit_results(out, runs, message):
  """--commit: the result JSONs of `runs` that git does not hold yet, in one
  commit, so a grid cut short by a machine restart keeps what it finished
  (OUT/results must be inside a git checkout; runs/ and data/ are not
  added). Only these paths are committed, whatever else is staged."""
  paths = [p for p in (result_path(out, r) for r in runs) if os.path.exists(p)]
  if not paths:
    return
  folder = os.path.dirname(paths[0])
  for attempt in range(3):
    try:
      _git(folder, 'add', *paths)
      if subprocess.run(['git', 'diff', '--cached', '--quiet', '--', *paths],
                        cwd=folder).returncode:
        _git(folder, 'commit', '-m', message, '--', *paths)
      return
    except subprocess.CalledProcessError as e:
      # Another git command holding the index lock, most likely: retry;
      # then go on (the result is on disk; the next start commits it).
      error = e.stderr.strip()
      time.sleep(2 ** attempt)
  print(f'--commit: could not commit {message!r}: {error}', flush=True)


def run_parallel(runs, args, out, report):
  """`runs` N at a time, each in a worker process of its own."""
  ctx = multiprocessing.get_context('spawn')
  devices = ctx.Manager().Queue()
  for i in range(args.parallel):
    devices.put(i)
  with concurrent.futures.ProcessPoolExecutor(
      args.parallel, mp_context=ctx, initializer=_pin_device,
      initargs=(devices,)) as pool:
    futures = {pool.submit(execute, r, args, out): r for r in runs}
    for future in concurrent.futures.as_completed(futures):
      try:
        summary = future.result()
      except Exception as e:  # One run's failure does not stop the grid.
        report(futures[future], error=e)
      else:
        report(futures[future], summary)


def _pin_device(devices):
  """Each worker process takes one GPU (harmless elsewhere)."""
  try:
    os.environ['CUDA_VISIBLE_DEVICES'] = str(devices.get_nowait())
  except queue.Empty:
    pass

