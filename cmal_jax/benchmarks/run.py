"""python -m cmal_jax.benchmarks [--sizes=tiny,small,base] [--steps=10]

Measures, in one run and side by side:
  1. peak: a large float32 jnp.dot, GFLOP/s (what MFU is relative to);
  2. the pre-training step (CMAL: AMC + MLM + ITM, CMAP on; forward,
     backward, optimizer) per size: examples/s, median step time (min/max
     over the timed steps), FLOPs per step from XLA's cost analysis, MFU.
     The step is the one of ITM's warm-up (bench_config: ITM reads the
     CMAP pass), the computation the PyTorch mirror runs; with
     --default_program also the default config's program (at step 0 it
     takes the same branch; after the warm-up it adds the label-blind
     pass);
  3. the same step in the PyTorch mirror (same weights, batch, objectives,
     optimizer): eager and torch.compile, and JAX / PyTorch;
  4. the JAX step with CMAP off, and (--paper_behaviour) with the
     shortcuts of docs/controls.md open: what their fixes cost a step;
  5. the input pipeline alone (default workers), and its ratio to what the
     train step consumes;
  6. the train step's compile time;
  7. on paper, for --paper_size at its config batch: FLOPs and bytes per
     step and the step time and MFU they imply on an H100 and a TPU v5e;
  8. predict, per --predict_sizes: a VQA model's answer to one question
     (cmal_jax.predict.Predictor, random weights on the synthetic world):
     the first call (compiles) and the compiled call's latency, and the
     API's questions/s at batch 1 and at eval.batch_size, interleaved.
Writes BENCHMARKS.md (table + machine) and BENCHMARKS.json (one object per
measurement: name, size, value, unit) to --out_dir.
"""

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmal_jax import (cli_errors, config_base, finetune, objectives,
                      predict, pretraining, sharding, train_step)
from cmal_jax.benchmarks import sections
from cmal_jax.data import pipeline, task_pipeline
from cmal_jax.data.tokenizer import load_tokenizer
from cmal_jax.export import export

# Batch sizes that keep a CPU step in seconds; --batch overrides them.
CPU_BATCH = {'tiny': 32, 'small': 64, 'base': 16, 'minilm': 64}
# Dense bf16 peak FLOP/s and memory bandwidth (bytes/s), vendor figures.
ACCELERATORS = {
    'H100 SXM': (989e12, 3.35e12),
    'TPU v5e': (197e12, 819e9),
}


# ------------------------------------------------------------- measuring

def timed(fn, steps, warmup):
  """Runs fn() warmup + steps times (fn blocks until its result is ready).
  -> {'median', 'min', 'max'} seconds over the timed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return dict(median=statistics.median(times), min=min(times),
              max=max(times))


def measure_peak(n, steps, warmup):
  """A float32 [n, n] @ [n, n] -> (GFLOP/s at the median, timing)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  t = timed(lambda: dot(a, a).block_until_ready(), steps, warmup)
  return 2 * n ** 3 / t['median'] / 1e9, t


def bench_config(size, batch, cmap=True, records='', behaviour='fixed',
                 itm_warmup_phase=True):
  """The pre-training config of `size` (CMAL recipe, `behaviour`: configs/
  pretrain.py's fixed or paper) at `batch`, on `records` (a records
  directory) or a synthetic world just big enough for the benchmark.

  itm_warmup_phase: ITM reads the CMAP pass throughout, the step of ITM's
  warm-up (the default step holds it and the label-blind step as two
  branches, objectives.Loss.branches, and XLA's cost analysis would count
  both); False: the config as it is.
  """
  config = config_base.config_module('pretrain').get_config(
      f'{size},{behaviour}')
  if itm_warmup_phase:
    config.loss.itm_inputs = 'corrupted'
    config.loss.itm_corrupted_warmup = 0.0
  config.data.dir = records
  config.batch_size = batch
  config.cmap.enabled = cmap
  config.world.num_train = max(8 * batch, 512)
  config.eval.batch_size = min(config.eval.batch_size, 64)
  config.world.num_eval = config.eval.batch_size
  return config


class JaxStep:
  """A pre-training job's train state and jitted step on one batch."""

  def __init__(self, config, workdir):
    self.config = config
    self.mesh = sharding.mesh_from_config(config)
    self.axis_rules = sharding.rules(config)
    local = sharding.per_process_batch_size(config.batch_size, self.mesh)
    self.job = pretraining.make_job(config, workdir, self.mesh, self.axis_rules,
                                  local)
    tx, schedule = train_step.make_optimizer(config)
    with self.scope():
      self.state, shardings = train_step.create_train_state(
          self.job.model, self.job.init_inputs, self.job.stat_keys, tx,
          config, self.mesh, self.axis_rules,
          extra_state=self.job.loss.extra_state)
      self.step_fn = train_step.jit_train_step(self.job.loss, config, schedule,
                                          shardings, self.mesh)
    self.iterator = pipeline.to_iterator(self.job.train_ds, config)
    self.local_batch = next(self.iterator)
    self.batch = sharding.global_batch(self.local_batch, self.mesh)
    self.params = jax.device_get(self.state.params)  # Before any update.

  def scope(self):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.axis_rules))
    return stack

  def compile(self, batch=None):
    """-> (compiled step, seconds to lower and compile). batch: shapes to
    compile for (default the real batch)."""
    with self.scope():
      t = time.perf_counter()
      compiled = self.step_fn.lower(self.state, batch or self.batch).compile()
      return compiled, time.perf_counter() - t

  def stepper(self, compiled):
    """-> step(): runs one train step, returns its seconds."""
    def step():
      with self.scope():
        t = time.perf_counter()
        self.state, metrics = compiled(self.state, self.batch)
        jax.block_until_ready(metrics['loss'])
        return time.perf_counter() - t
    return step

  def corrupted_inputs(self):
    """(inputs, targets) of one step's corruption, as numpy."""
    specials = objectives.SpecialTokens.from_tokenizer(load_tokenizer(
        self.config.data.vocab_path or None))
    batch = {k: v for k, v in self.local_batch.items() if k != 'stats'}
    prepare = jax.jit(lambda b, r: objectives.prepare_inputs(
        b, r, self.config, specials))
    return jax.device_get(prepare(batch, jax.random.key(1)))


def cost(compiled):
  """XLA's cost analysis of a compiled step: (FLOPs, bytes accessed)."""
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):  # Older JAX: one dict per computation.
    c = c[0]
  return float(c.get('flops', 0.0)), float(c.get('bytes accessed', 0.0))


def abstract_batch(batch, global_batch_size):
  """ShapeDtypeStructs of `batch` at another global batch size."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((global_batch_size,) + x.shape[1:],
                                     x.dtype, sharding=x.sharding), batch)


# ---------------------------------------------------------------- the run

class Results:
  """Measurements in order: name, size, value, unit (+ min/max)."""

  def __init__(self, rows=None, **defaults):
    self.rows = [] if rows is None else rows
    self.defaults = defaults

  def for_batch(self, batch):
    """The same results, each new row recording `batch`."""
    return Results(self.rows, batch=batch)

  def add(self, name, size, value, unit, **extra):
    row = dict(name=name, size=size, value=value, unit=unit,
               **{**self.defaults, **extra})
    self.rows.append(row)
    shown = f'{value:.4g}' if isinstance(value, float) else value
    print(f'  {name} [{size}]: {shown} {unit}', flush=True)
    return value


def interleaved(contenders, rounds, warmup, pause=0.3, rewarm=1):
  """Times each contender's step(), round by round in turn (in a new
  random order each round, so none always follows the same other), so a
  noisy machine slows them alike.
  contenders: {name: step() -> seconds}. In its turn a contender first runs
  `rewarm` untimed steps: the first step after another process's step is
  slower, by up to a third at `base` (docs/benchmarks.md), which would
  time the switch rather than the step. A pause after each turn lets its
  thread pool go idle (OpenMP threads spin for a while after a parallel
  region). -> {name: {'median', 'min', 'max'}}."""
  names = list(contenders)
  times = {name: [] for name in names}
  order = np.random.default_rng(0)
  for r in range(warmup + rounds):
    for name in order.permutation(names):
      for _ in range(rewarm):
        contenders[name]()
      t = contenders[name]()
      time.sleep(pause)
      if r >= warmup:
        times[name].append(t)
  return {name: dict(median=statistics.median(ts), min=min(ts), max=max(ts))
          for name, ts in times.items()}


def bench_size(size, batch, args, results, data_root, peak_flops):
  """Items 2-6 for one size: the JAX step with CMAP on and off and the
  PyTorch steps, interleaved; then the pipeline alone."""
  print(f'{size} (batch {batch}):', flush=True)
  results = results.for_batch(batch)  # Every row of this size names it.
  workdir = os.path.join(data_root, size)
  step = JaxStep(bench_config(size, batch, records=args.records), workdir)
  compiled, compile_s = step.compile()
  results.add('jax_compile_time', size, compile_s, 's')
  flops, _ = cost(compiled)
  results.add('flops_per_step', size, flops, 'FLOP')
  contenders = {'jax': step.stepper(compiled)}
  if args.cmap_off:
    off = JaxStep(bench_config(size, batch, cmap=False,
                               records=args.records), workdir)
    contenders['jax_cmap_off'] = off.stepper(off.compile()[0])
  if args.paper_behaviour:
    paper = JaxStep(bench_config(size, batch, records=args.records,
                                 behaviour='paper'), workdir)
    contenders['jax_paper_behaviour'] = paper.stepper(paper.compile()[0])
  if args.default_program:
    default = JaxStep(bench_config(size, batch, records=args.records,
                                   itm_warmup_phase=False), workdir)
    contenders['jax_default_program'] = default.stepper(
        default.compile()[0])
  workers = []
  if args.torch:
    inputs, targets = step.corrupted_inputs()
    for mode in ['eager'] + (['compile'] if args.torch_compile else []):
      try:
        worker = TorchWorker(step, inputs, targets, mode)
        first = worker.step()  # torch.compile compiles here.
      except Exception as e:  # torch.compile needs a working toolchain.
        results.add(f'torch_{mode}_examples_per_sec', size, None,
                    'examples/s', error=f'{type(e).__name__}: {e}'[:300])
        continue
      if mode == 'compile':
        results.add('torch_compile_first_step_time', size, first, 's')
      workers.append(worker)
      contenders[f'torch_{mode}'] = worker.step
  try:
    t = interleaved(contenders, args.steps, args.warmup)
  finally:
    for worker in workers:
      worker.close()

  def add_time(name, timing):
    results.add(f'{name}_step_time', size, timing['median'], 's',
                min=timing['min'], max=timing['max'])
    return results.add(f'{name}_examples_per_sec', size,
                       batch / timing['median'], 'examples/s')
  jax_eps = add_time('jax', t['jax'])
  results.add('jax_mfu', size, flops / t['jax']['median'] / peak_flops,
              'fraction of peak')
  for name in contenders:
    if name.startswith('torch_'):
      torch_eps = add_time(name, t[name])
      results.add(f'jax_over_{name}', size, jax_eps / torch_eps, 'ratio')
  if args.cmap_off:
    add_time('jax_cmap_off', t['jax_cmap_off'])
    results.add('cmap_overhead', size,
                t['jax']['median'] / t['jax_cmap_off']['median'] - 1,
                'fraction of the step')

  if args.default_program:
    add_time('jax_default_program', t['jax_default_program'])
    results.add('default_program_overhead', size,
                t['jax_default_program']['median'] / t['jax']['median'] - 1,
                'fraction of the step')

  if args.paper_behaviour:
    add_time('jax_paper_behaviour', t['jax_paper_behaviour'])
    results.add('shortcut_fixes_overhead', size,
                t['jax']['median'] / t['jax_paper_behaviour']['median'] - 1,
                'fraction of the step')

  if size in args.pipeline_sizes:
    it = step.iterator
    t_pipe = timed(lambda: next(it), args.pipeline_batches, 5)
    pipe_eps = results.add('pipeline_examples_per_sec', size,
                           batch / t_pipe['median'], 'examples/s',
                           min=batch / t_pipe['max'],
                           max=batch / t_pipe['min'])
    results.add('pipeline_over_step_consumption', size, pipe_eps / jax_eps,
                'ratio')


class TorchWorker:
  """The PyTorch mirror's step in its own process (spawned), so neither
  framework's thread pool competes with the other's; step() runs one step
  there and returns its seconds."""

  def __init__(self, step, inputs, targets, mode):
    job = dict(model_config=export.export_config(step.config, step.params),
               params=step.params, config=step.config,
               lr=float(train_step.make_optimizer(step.config)[1](1)),
               inputs=inputs, targets=targets, mode=mode)
    ctx = multiprocessing.get_context('spawn')
    self.conn, child = ctx.Pipe()
    self.process = ctx.Process(target=_torch_worker, args=(child, job),
                               daemon=True)
    self.process.start()
    self._receive()  # Ready, or the error that stopped it.

  def _receive(self):
    kind, value = self.conn.recv()
    if kind == 'error':
      self.close()
      raise RuntimeError(value)
    return value

  def step(self):
    self.conn.send('step')
    return self._receive()

  def close(self):
    if self.process.is_alive():
      self.conn.send('stop')
      self.process.join(30)


def _torch_worker(conn, job):
  # torch.compile's parallel compile workers would outlive the compile and
  # share the cores with the timed steps.
  os.environ.setdefault('TORCHINDUCTOR_COMPILE_THREADS', '1')
  try:
    from cmal_jax.benchmarks import torch_step
    _, run_step = torch_step.make_torch_step(
        job['model_config'], job['params'], job['config'], job['lr'],
        compile_mode=None if job['mode'] == 'eager' else 'default')
    inputs = torch_step.to_torch(job['inputs'])
    targets = torch_step.to_torch(job['targets'])
    conn.send(('ready', None))
    while conn.recv() == 'step':
      t = time.perf_counter()
      run_step(inputs, targets).item()
      conn.send(('time', time.perf_counter() - t))
  except Exception as e:  # Reported to the parent, which names it.
    conn.send(('error', f'{type(e).__name__}: {e}'))


def paper_figures(size, args, results, data_root):
  """Item 7: FLOPs and bytes of one step at the config's batch, compiled
  (not run) here, and what they imply on accelerators."""
  batch = config_base.config_module('pretrain').get_config(size).batch_size
  step = JaxStep(bench_config(size, CPU_BATCH.get(size, 16),
                              records=args.records),
                 os.path.join(data_root, size))
  compiled, _ = step.compile(abstract_batch(step.batch, batch))
  flops, bytes_accessed = cost(compiled)
  results.add('paper_flops_per_step', size, flops, 'FLOP', batch=batch)
  results.add('paper_bytes_per_step', size, bytes_accessed, 'bytes',
              batch=batch)
  for name, (peak, bandwidth) in ACCELERATORS.items():
    roofline = max(flops / peak, bytes_accessed / bandwidth)
    results.add(f'paper_{name}_step_time_roofline', size, roofline, 's',
                batch=batch)
    results.add(f'paper_{name}_mfu_roofline', size, flops / roofline / peak,
                'fraction of peak', batch=batch)
    results.add(f'paper_{name}_step_time_at_50pct_mfu', size,
                flops / (0.5 * peak), 's', batch=batch)


def random_vqa_predictor(size, workdir):
  """A Predictor of configs/finetune.py:vqa,SIZE with random weights (its
  latency does not depend on them), over a synthetic vqa world of one eval
  batch per split generated into workdir/data."""
  config = config_base.config_module('finetune').get_config(f'vqa,{size}')
  B = config.eval.batch_size
  config.world.num_train = config.world.num_eval = config.world.num_test = B
  directory = os.path.join(workdir, 'data')
  finetune.ensure_task_data(config, directory)
  vocab = task_pipeline.load_or_build_answer_vocab(
      directory, config.finetune.num_answers)
  model = finetune.task_model(config, len(vocab))
  params = jax.device_get(nn.unbox(jax.jit(lambda r: model.init(
      r, finetune.init_inputs(config)))(jax.random.key(0))['params']))
  return predict.Predictor(config, params, workdir=workdir, where='random',
                           answer_vocab=vocab)


def bench_predict(size, args, results, data_root):
  """Item 8 for one size: one question's latency (first call: compiles;
  then compiled), and questions/s at batch 1 and at eval.batch_size."""
  print(f'predict, vqa {size}:', flush=True)
  predictor = random_vqa_predictor(size, os.path.join(data_root,
                                                      f'predict_{size}'))
  examples = task_pipeline.read_task_examples(predictor.directory, 'vqa',
                                              'test')
  images = [ex['image_id'] for ex in examples]
  questions = [ex['question'] for ex in examples]
  B = predictor.batch_size

  def asker(n):
    """-> ask(): answers the first n questions, returns its seconds."""
    def ask():
      t = time.perf_counter()
      predictor.answer(images[:n], questions[:n])
      return time.perf_counter() - t
    return ask
  one, batch = asker(1), asker(B)
  results.add('predict_first_call_time', size, one(), 's', batch=1)
  batch()  # Compiles batch B's program outside the timed rounds.
  t = interleaved({'one': one, 'batch': batch}, args.steps, args.warmup)
  results.add('predict_latency', size, t['one']['median'], 's', batch=1,
              min=t['one']['min'], max=t['one']['max'])
  at_1 = results.add('predict_questions_per_sec', size,
                     1 / t['one']['median'], 'questions/s', batch=1)
  at_b = results.add('predict_questions_per_sec', size,
                     B / t['batch']['median'], 'questions/s', batch=B,
                     min=B / t['batch']['max'], max=B / t['batch']['min'])
  results.add('predict_batch_over_batch_1', size, at_b / at_1, 'ratio',
              batch=B)


# ----------------------------------------------------------------- output

def machine():
  """What the figures were measured on."""
  cpu = platform.processor() or ''
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((l.split(':', 1)[1].strip() for l in f
                  if l.startswith('model name')), cpu)
  except OSError:
    pass
  memory = None
  try:
    with open('/proc/meminfo') as f:
      memory = int(f.readline().split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  info = dict(cpu=cpu, cores=os.cpu_count(), memory_bytes=memory,
              python=platform.python_version(), jax=jax.__version__,
              backend=jax.default_backend(), devices=jax.device_count(),
              device_kind=jax.devices()[0].device_kind,
              xla_flags=os.environ.get('XLA_FLAGS', ''),
              time=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))
  try:
    import torch
    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
  except ImportError:
    info['torch'] = None
  return info


def fmt(value, unit):
  if value is None:
    return 'failed'
  if unit == 'FLOP' or unit == 'bytes':
    return f'{value / 1e9:.1f} G{"FLOP" if unit == "FLOP" else "B"}'
  if unit.startswith('fraction'):
    return f'{100 * value:.1f} %'
  if unit == 's':
    return f'{value * 1e3:.1f} ms' if value < 1 else f'{value:.2f} s'
  if unit == 'ratio':
    return f'{value:.2f}×'
  return f'{value:.1f} {unit}'


def write_outputs(out_dir, results, info, args):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'BENCHMARKS.json'), 'w') as f:
    json.dump(dict(machine=info, command=args.command,
                   measurements=results.rows), f, indent=1)
  lines = ['# Benchmarks', '',
           f'`{args.command}`, {info["time"]}.', '',
           '**Machine:** ' + ', '.join(f'{k} {v}' for k, v in info.items()
                                       if k != 'time'), '',
           '| measurement | size | value | min – max | note |',
           '|---|---|---|---|---|']
  for r in results.rows:
    spread = (f'{fmt(r["min"], r["unit"])} – {fmt(r["max"], r["unit"])}'
              if 'min' in r else '')
    note = r.get('error') or (f'batch {r["batch"]}' if 'batch' in r else '')
    lines.append(f'| {r["name"]} | {r["size"]} | {fmt(r["value"], r["unit"])}'
                 f' | {spread} | {note} |')
  path = os.path.join(out_dir, 'BENCHMARKS.md')
  kept = sections.read_sections(path)  # Other commands' figures.
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n' + ''.join('\n' + s for s in kept))


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m cmal_jax.benchmarks',
                              description=__doc__.split('\n\n')[1])
  p.add_argument('--sizes', default='tiny,small,base')
  p.add_argument('--batch', default='',
                 help='size=batch overrides, e.g. base=32,small=128')
  p.add_argument('--steps', type=int, default=10, help='timed steps')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--peak_n', type=int, default=4096,
                 help='the peak matmul is [n, n] @ [n, n]')
  p.add_argument('--torch', action=argparse.BooleanOptionalAction,
                 default=True, help='time the PyTorch mirror')
  p.add_argument('--torch_compile', action=argparse.BooleanOptionalAction,
                 default=True, help='also time torch.compile')
  p.add_argument('--cmap_off', action=argparse.BooleanOptionalAction,
                 default=True, help='also time the step with CMAP off')
  p.add_argument('--paper_behaviour', action=argparse.BooleanOptionalAction,
                 default=False,
                 help='also time the step with the shortcuts open '
                 '(configs/pretrain.py PAPER_BEHAVIOUR: one UMSE and one '
                 'unified pass fewer)')
  p.add_argument('--default_program', action=argparse.BooleanOptionalAction,
                 default=False,
                 help="also time the default config's program (ITM's "
                 'warm-up and label-blind steps as two branches) at step 0; '
                 'a third JAX train state: with both PyTorch workers, base '
                 'needs more than 24 GiB')
  p.add_argument('--pipeline_sizes', default='small')
  p.add_argument('--pipeline_batches', type=int, default=50)
  p.add_argument('--paper_size', default='base',
                 help="the size of item 7 ('' skips it)")
  p.add_argument('--predict_sizes', default='small',
                 help="sizes of item 8, predict's latency ('' skips it)")
  p.add_argument('--data_dir', default='',
                 help='where the synthetic data goes (default a temp dir); '
                 'reused when it exists')
  p.add_argument('--records', default='',
                 help='a records directory (python -m cmal_jax.world.scenes) '
                 'to read instead of generating a world per size')
  p.add_argument('--out_dir', default='.')
  cli_errors.add_verbose_flag(p)
  args = p.parse_args(argv)
  args.sizes = [s for s in args.sizes.split(',') if s]
  args.pipeline_sizes = [s for s in args.pipeline_sizes.split(',') if s]
  args.predict_sizes = [s for s in args.predict_sizes.split(',') if s]
  overrides = dict(kv.split('=') for kv in args.batch.split(',') if kv)
  args.batches = {s: int(overrides.get(s, CPU_BATCH.get(s, 16)))
                  for s in args.sizes}
  return args


def main(argv=None):
  args = parse_args(argv)
  args.command = 'python -m cmal_jax.benchmarks ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  info = machine()
  print('Machine:', json.dumps(info), flush=True)
  results = Results()
  peak, t = measure_peak(args.peak_n, max(args.steps, 3), 1)
  results.add('peak_matmul', f'{args.peak_n}²', peak, 'GFLOP/s',
              min=2 * args.peak_n ** 3 / t['max'] / 1e9,
              max=2 * args.peak_n ** 3 / t['min'] / 1e9)
  with tempfile.TemporaryDirectory() as tmp:
    data_root = args.data_dir or tmp
    for size in args.sizes:
      bench_size(size, args.batches[size], args, results, data_root,
                 peak * 1e9)
    if args.paper_size:
      paper_figures(args.paper_size, args, results, data_root)
    for size in args.predict_sizes:
      bench_predict(size, args, results, data_root)
  write_outputs(args.out_dir, results, info, args)
  print(f'Wrote {args.out_dir}/BENCHMARKS.md and BENCHMARKS.json.')
