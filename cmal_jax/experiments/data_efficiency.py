"""CMAL vs contrastive pre-training at small corpus sizes (the paper's claim).

  python -m cmal_jax.experiments.data_efficiency --out=runs/data_efficiency

(from the repository root: it reads configs/pretrain.py and finetune.py).

For every seed and corpus size it pre-trains with each recipe of
configs/pretrain.py, CMAL (AMC + MLM + ITM), CMCL (ITC + MLM + ITM),
MLM + ITM, SemVLP (MLM + masked object prediction + ITM, with a
cross-attention sub-layer) and SemMIM (reads pixels: text-guided masked
image modelling), with the same steps and batch; fine-tunes each checkpoint
(and a random init) on the tasks, in its recipe's fine-tuning config; and
writes a table (mean ± std over seeds) and a plot of each task's test metric
against the corpus size, one line per recipe.

The synthetic data of a seed and corpus size (or task) is one folder shared
by the recipes that read region features; the recipes that read pixels
(SemMIM) read the same pairs with their images, from a folder of their own
(suffix -pixels).

Every run is its own workdir under OUT/runs and leaves OUT/results/NAME.json
when it is done, so an interrupted grid continues where it stopped (a run
cut short resumes from its checkpoint), and a grid extended by recipes
(--recipes=semvlp,semmim on an OUT that holds the others) runs only theirs:
the table shows the finished runs of the other recipes in OUT too.
--parallel N runs N at a time, each in its own process (on GPUs, one GPU
each).
"""

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import queue
import shutil
import subprocess
import time
import traceback

from cmal_jax import configlib, recipes
from configs import finetune as finetune_config
from configs import pretrain as pretrain_config

RECIPES = recipes.RECIPES
# The table's title names the recipes so.
RECIPE_TITLES = {'cmal': 'CMAL', 'cmcl': 'CMCL', 'mlm_itm': 'MLM + ITM',
                 'semvlp': 'SemVLP', 'semmim': 'SemMIM'}
TASKS = ('ve', 'rec', 'vqa')
# The metric each task is judged by (its fine-tuning config's best_metric).
TASK_METRIC = configlib.BEST_METRIC
# CMAL's own choices, ablated on the smallest corpus (--ablations): name ->
# config overrides of the cmal recipe (the main cmal run is the reference:
# both AMC targets, select_prob 0.5, swap 0.8 / mask 0.1 / keep 0.1).
ABLATIONS = {
    'amc_pairing': {'loss.amc_targets': 'pairing'},
    'amc_label': {'loss.amc_targets': 'label'},
    'select_0.25': {'cmap.select_prob': 0.25},
    'select_0.75': {'cmap.select_prob': 0.75},
    'mask_only': {'cmap.swap_prob': 0.0, 'cmap.mask_prob': 0.9},
    'no_hypersphere': {'model.hypersphere': False},
}


@dataclasses.dataclass(frozen=True)
class Run:
  """One pre-training or fine-tuning run of the grid."""
  kind: str  # 'pretrain' or 'finetune'.
  seed: int
  recipe: str  # A pre-training recipe, or 'random' (fine-tuning from scratch).
  corpus: int  # Pre-training pairs (0 for 'random').
  task: str = 'pretrain'
  ablation: str = ''  # A key of ABLATIONS (recipe cmal), or ''.

  @property
  def init(self):
    """The recipe, with its ablation: 'cmal', 'cmal+mask_only', 'random'."""
    return f'{self.recipe}+{self.ablation}' if self.ablation else self.recipe

  @property
  def name(self):
    init = (f'{self.init}-{self.corpus}' if self.recipe != 'random'
            else 'random')
    return f'{self.task}-{init}-s{self.seed}'

  @property
  def pretrain(self):
    """The pre-training run this fine-tuning starts from."""
    return Run('pretrain', self.seed, self.recipe, self.corpus,
               ablation=self.ablation)


def grid(args):
  """Every run, pre-training before the fine-tuning that needs it."""
  runs = []
  smallest = min(args.corpus_sizes)
  ablations = [(smallest, a) for a in args.ablations]
  for seed in args.seeds:
    inits = [(c, r, '') for c in args.corpus_sizes for r in args.recipes]
    inits += [(c, 'cmal', a) for c, a in ablations]
    if not args.pretrained_from:  # Else another grid pre-trained them.
      for corpus, recipe, ablation in inits:
        runs.append(Run('pretrain', seed, recipe, corpus, ablation=ablation))
    for task in args.tasks:
      if args.random_init:
        runs.append(Run('finetune', seed, 'random', 0, task))
      for corpus, recipe, ablation in inits:
        runs.append(Run('finetune', seed, recipe, corpus, task, ablation))
  return runs


def run_config(run, args, out):
  """The ml_collections config of `run`."""
  if run.kind == 'pretrain':
    c = pretrain_config.get_config(f'{args.size},{run.recipe}')
    c.world.num_train = run.corpus
    c.total_steps = args.pretrain_steps or c.total_steps
    c.data.dir = data_folder(out, 'pretrain', run.seed, run.corpus,
                             pixels=configlib.reads_pixels(c))
  else:
    # The model of the checkpoint it starts from (random init: CMAL's).
    recipe = 'cmal' if run.recipe == 'random' else run.recipe
    c = finetune_config.get_config(f'{run.task},{args.size},{recipe}')
    c.total_steps = args.finetune_steps or c.total_steps
    if args.pretrained_lr_mult:
      c.finetune.pretrained_lr_mult = args.pretrained_lr_mult
    if args.finetune_examples:  # Synthetic train / val / test examples.
      c.world.num_train, c.world.num_eval, c.world.num_test = (
          args.finetune_examples)
      # Periodic evaluations on the larger val split: a handful per run.
      c.eval.every_steps = max(c.total_steps // 5, 1)
    c.data.dir = data_folder(out, run.task, run.seed,
                             pixels=configlib.reads_pixels(c))
    if run.recipe != 'random':
      c.init_from = os.path.join(pretrain_out(args, out), 'runs',
                                 run.pretrain.name)
  for field, value in ABLATIONS.get(run.ablation, {}).items():
    section, name = field.split('.')
    # The model's switches hold when fine-tuning too (they change no
    # parameter, so init_from could not tell); CMAP and losses pre-train.
    if run.kind == 'pretrain' or section == 'model':
      c[section][name] = value
  c.seed = run.seed
  c.batch_size = args.batch_size or c.batch_size
  if run.kind == 'pretrain':  # Zero-shot retrieval over this many images.
    c.eval.retrieval_images = min(c.eval.retrieval_images,
                                  args.retrieval_images)
  return c


def data_folder(out, task, seed, corpus=None, pixels=False):
  """OUT/data/{task}[-{corpus}]-s{seed}, shared by the recipes that read
  region features; pixels: the same data with images (-pixels), for the
  recipes that read pixels. A folder is generated once (where its splits are
  missing) and never checked against the config again, so the two kinds
  must not share one."""
  size = f'-{corpus}' if corpus is not None else ''
  kind = '-pixels' if pixels else ''
  return os.path.join(out, 'data', f'{task}{size}-s{seed}{kind}')


def pretrain_out(args, out):
  """Where the pre-training runs live: --pretrained_from, or this grid."""
  return os.path.abspath(args.pretrained_from) if args.pretrained_from else out


def result_path(out, run):
  return os.path.join(out, 'results', run.name + '.json')


def summarise(run, results, seconds):
  """The small JSON a finished run leaves: what the table needs."""
  out = dict(run=run.name, **dataclasses.asdict(run),
             seconds=round(seconds, 1))
  if run.kind == 'pretrain':
    keep = ('amc_pair_acc', 'amc_pair_acc_all_swapped', 'itm_acc', 'mlm_acc',
            'retrieval_t2i_r1', 'retrieval_i2t_r1', 'retrieval_itc_t2i_r1',
            'retrieval_itc_i2t_r1')
    out['metrics'] = {k: results[k] for k in keep if k in results}
  else:
    metric = TASK_METRIC[run.task]
    test = next(k for k in results if k.startswith('test'))
    out['metrics'] = {'val': results['val'][metric],
                      'test': results[test][metric], 'metric': metric,
                      'best_step': results['best_step']}
  return out


def prepare_data(config):
  """Generates the synthetic data a run's config reads where it is missing:
  a (seed, corpus) or (seed, task) folder, shared by every recipe that reads
  the same inputs (region features, or pixels: data_folder)."""
  from cmal_jax import finetune
  from cmal_jax.world import synthetic
  # Both refuse a pixel run on a folder without images
  # (synthetic.check_images).
  if config.task == 'pretrain':
    synthetic.ensure_world_data(config, config.data.dir)
  else:
    finetune.ensure_task_data(config, config.data.dir)


def execute(run, args, out):
  """Runs `run` in this process (resuming its workdir) and writes its
  result JSON; returns the summary."""
  import jax
  from cmal_jax import guards, train
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
  results = train.train_and_evaluate(config, workdir)
  summary = summarise(run, results, time.time() - t)
  path = result_path(out, run)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Atomic: a result is whole or absent, so resuming can trust it.
  guards.write_text_atomic(path, json.dumps(summary, indent=1))
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


def run_grid(args):
  out = os.path.abspath(args.out)
  runs = grid(args)
  if args.commit:  # Results a crash left uncommitted.
    commit_results(out, runs, 'data_efficiency: results of an earlier run')
  todo = [r for r in runs if not os.path.exists(result_path(out, r))]
  if args.pretrained_from:
    missing = sorted({r.pretrain.name for r in todo if r.recipe != 'random'
                      and not os.path.exists(result_path(
                          pretrain_out(args, out), r.pretrain))})
    if missing:
      raise SystemExit(f'--pretrained_from={args.pretrained_from} has not '
                       f'finished {len(missing)} pre-training run(s) this '
                       f'grid fine-tunes: {", ".join(missing)}.')
  print(f'{len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to go.',
        flush=True)
  # Data first, in this process: parallel runs of one seed would race to
  # write the same folder.
  configs = (run_config(r, args, out) for r in todo)
  for config in {c.data.dir: c for c in configs}.values():
    prepare_data(config)
  failed, finished = {}, len(runs) - len(todo)

  def report(run, summary=None, error=None):
    nonlocal finished
    if error is not None:  # The worker's traceback is in error.__cause__.
      traceback.print_exception(error)
      failed[run.name] = f'{type(error).__name__}: {error}'
      print(f'{run.name} FAILED: {failed[run.name]}', flush=True)
      return
    if args.commit:
      commit_results(out, [run], f'data_efficiency: {run.name}')
    finished += 1
    print(f'[{finished}/{len(runs)}] {run.name}: {summary["metrics"]} '
          f'({summary["seconds"]:.0f}s)', flush=True)

  for kind in ('pretrain', 'finetune'):  # Fine-tuning needs its checkpoint.
    phase = []
    for run in (r for r in todo if r.kind == kind):
      if kind == 'finetune' and run.recipe != 'random' and (
          run.pretrain.name in failed):
        failed[run.name] = f'its pre-training {run.pretrain.name} failed'
      else:
        phase.append(run)
    if args.parallel <= 1:
      for run in phase:
        try:
          report(run, execute(run, args, out))
        except Exception as e:  # One run's failure does not stop the grid.
          report(run, error=e)
    else:
      _run_parallel(phase, args, out, report)
  tasks = write_report(out, runs, args)
  if failed:
    raise SystemExit(
        f'{len(failed)} run(s) failed (the rest finished; the same command '
        'retries them): ' + '; '.join(f'{k}: {v}' for k, v in failed.items()))
  return tasks


def _run_parallel(runs, args, out, report):
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


# ------------------------------------------------------------------ report

def load_results(out, runs):
  results = {}
  for run in runs:
    path = result_path(out, run)
    if os.path.exists(path):
      with open(path) as f:
        results[run] = json.load(f)
  return results


def mean_std(values):
  if not values:
    return float('nan'), float('nan')
  m = sum(values) / len(values)
  sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if (
      len(values) > 1) else 0.0
  return m, sd


def table(results, args):
  """{(task, recipe, corpus): (mean, std, n)} of the test metrics, and the
  pre-training metrics {(recipe, corpus): {metric: (mean, std, n)}}."""
  tasks, pre = {}, {}
  for run, r in results.items():
    key = (run.init, run.corpus)
    if run.kind == 'pretrain':
      for k, v in r['metrics'].items():
        pre.setdefault(key, {}).setdefault(k, []).append(v)
    else:
      tasks.setdefault((run.task,) + key, []).append(r['metrics']['test'])
  fold = lambda vs: (*mean_std(vs), len(vs))
  return ({k: fold(v) for k, v in tasks.items()},
          {k: {m: fold(v) for m, v in d.items()} for k, d in pre.items()})


def blind_baselines(out, args):
  """{task: (mean, std, n)}: the score of a model that never sees the image
  (task_examples.blind_baseline, priors from train) on each seed's test
  split, for the tasks whose data this grid has."""
  from cmal_jax.data import region_store, task_pipeline, tasks
  from cmal_jax.world import task_examples
  scores = {}
  for task in args.tasks:
    for seed in args.seeds:
      # The same examples either way; the pixel folder when only recipes
      # that read pixels ran.
      folder = next((f for f in (data_folder(out, task, seed, pixels=p)
                                 for p in (False, True))
                     if os.path.exists(tasks.task_path(f, task, 'test'))),
                    None)
      if folder is None:
        continue  # Not generated (yet).
      regions = region_store.RegionStore(
          region_store.store_path(folder)) if task == 'rec' else None
      scores.setdefault(task, []).append(task_examples.blind_baseline(
          task_pipeline.read_task_examples(folder, task, 'test'), task,
          task_pipeline.read_task_examples(folder, task, 'train'), regions))
  return {t: (*mean_std(v), len(v)) for t, v in scores.items()}


def paired_differences(results, args):
  """Test-metric differences between two inits fine-tuned with the same seed:
  {(task, a, b, corpus): (mean, std, n, wins of a)}, a - b, for CMAL against
  each other recipe at every corpus size and for each ablation against CMAL
  on the smallest corpus. Pairing by seed removes what a seed's data and
  fine-tuning draws share."""
  by = {}
  for run, r in results.items():
    if run.kind == 'finetune':
      by[(run.task, run.init, run.corpus, run.seed)] = r['metrics']['test']
  pairs = [('cmal', other, c) for other in args.recipes if other != 'cmal'
           for c in args.corpus_sizes]
  pairs += [(f'cmal+{a}', 'cmal', min(args.corpus_sizes))
            for a in args.ablations]
  diffs = {}
  for task in args.tasks:
    for a, b, corpus in pairs:
      d = [by[(task, a, corpus, s)] - by[(task, b, corpus, s)]
           for s in args.seeds if (task, a, corpus, s) in by
           and (task, b, corpus, s) in by]
      if d:
        diffs[(task, a, b, corpus)] = (*mean_std(d), len(d),
                                       sum(x > 0 for x in d))
  return diffs


def other_recipes_runs(out, args):
  """The finished runs in OUT of the recipes --recipes leaves out (same
  seeds, corpus sizes and tasks; no ablations, no random init): a grid
  extended by recipes reports them next to its own."""
  others = tuple(r for r in RECIPES if r not in args.recipes)
  if not others:
    return []
  narrowed = argparse.Namespace(**{**vars(args), 'recipes': others,
                                   'ablations': (), 'random_init': False})
  return [r for r in grid(narrowed) if os.path.exists(result_path(out, r))]


def write_report(out, runs, args):
  """OUT/results.md, OUT/results.json and OUT/data_efficiency.png (and the
  same in --docs when given). Returns the task table."""
  results = load_results(out, runs)
  finished = len(results)
  others = other_recipes_runs(out, args)
  results.update(load_results(out, others))
  # The recipes of the rows, paired differences and plot: the grid's, and
  # with those of the other finished runs, all in configs/pretrain.py's
  # order.
  shown = {r.recipe for r in others}
  if shown:
    args = argparse.Namespace(**{**vars(args), 'recipes': tuple(
        r for r in RECIPES if r in args.recipes or r in shown)})
  tasks, pre = table(results, args)
  if args.pretrained_from:  # Their pre-training metrics, for the table.
    pre = table(load_results(pretrain_out(args, out), {
        r.pretrain for r in runs + others if r.recipe != 'random'}), args)[1]
  fmt = lambda t: (f'{t[0]:.3f} ± {t[1]:.3f}' if t[2] > 1 else
                   f'{t[0]:.3f}') if t else '-'
  title = ' vs '.join(RECIPE_TITLES.get(r, r) for r in args.recipes)
  also = (f' (and {len(others)} finished run(s) of '
          f'{", ".join(sorted(shown, key=RECIPES.index))} already in this '
          'folder)' if others else '')
  lines = [f'# Data efficiency: {title} ({args.size})', '',
           f'{finished} of {len(runs)} runs finished{also}; seeds '
           f'{list(args.seeds)}; ' + (
               f'pre-training runs of {args.pretrained_from}' if
               args.pretrained_from else
               f'pre-training {args.pretrain_steps or "default"} steps')
           + f', fine-tuning {args.finetune_steps or "default"} steps, '
           f'batch {args.batch_size or "default"}. Test metric, mean ± std '
           'over seeds.', '',
           '| recipe | corpus | ' + ' | '.join(
               f'{t} ({TASK_METRIC[t]})' for t in args.tasks)
           + ' | AMC pairing | ITM | zero-shot R@1 t2i |',
           '|---|---|' + '---|' * (len(args.tasks) + 3)]
  blind = blind_baselines(out, args)
  lines.append('| blind baseline | - | ' + ' | '.join(
      fmt(blind.get(t)) for t in args.tasks) + ' | - | - | - |')
  if args.random_init:
    lines.append('| random init | - | ' + ' | '.join(
        fmt(tasks.get((t, 'random', 0))) for t in args.tasks) + ' | - | - | - |')
  rows = [(r, c) for r in args.recipes for c in args.corpus_sizes]
  rows += [(f'cmal+{a}', min(args.corpus_sizes)) for a in args.ablations]
  for recipe, corpus in rows:  # A recipe (or ablation) and corpus size.
    p = pre.get((recipe, corpus), {})
    lines.append(f'| {recipe} | {corpus} | ' + ' | '.join(
        fmt(tasks.get((t, recipe, corpus))) for t in args.tasks) + ' | '
        + ' | '.join(fmt(p.get(m)) for m in (
            'amc_pair_acc', 'itm_acc', 'retrieval_t2i_r1')) + ' |')
  diffs = paired_differences(results, args)
  if diffs:
    lines += ['', 'Paired by seed: test metric of the first init minus the '
              'second, mean ± std over seeds (wins: seeds where the first is '
              'higher).', '', '| first - second | corpus | ' + ' | '.join(
                  args.tasks) + ' |', '|---|---|' + '---|' * len(args.tasks)]
    for a, b, corpus in dict.fromkeys(k[1:] for k in diffs):
      cells = []
      for task in args.tasks:
        d = diffs.get((task, a, b, corpus))
        cells.append(f'{d[0]:+.3f} ± {d[1]:.3f} ({d[3]}/{d[2]})' if d
                     else '-')
      lines.append(f'| {a} - {b} | {corpus} | ' + ' | '.join(cells) + ' |')
  lines += ['', 'Produced by:', '', '    python -m '
            'cmal_jax.experiments.data_efficiency ' + ' '.join(args.argv), '']
  text = '\n'.join(lines)
  targets = [out] + ([args.docs] if args.docs else [])
  for folder in targets:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'data_efficiency.md'), 'w') as f:
      f.write(text)
    with open(os.path.join(folder, 'data_efficiency.json'), 'w') as f:
      json.dump([r for r in results.values()], f, indent=1)
    plot(tasks, blind, args, os.path.join(folder, 'data_efficiency.png'))
  print(text, flush=True)
  return tasks


def plot(tasks, blind, args, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(args.tasks),
                           figsize=(4 * len(args.tasks), 3.2), squeeze=False)
  for ax, task in zip(axes[0], args.tasks):
    for recipe in args.recipes:
      points = [(c, tasks[(task, recipe, c)]) for c in args.corpus_sizes
                if (task, recipe, c) in tasks]
      if points:
        xs = [c for c, _ in points]
        ys = [t[0] for _, t in points]
        err = [t[1] for _, t in points]
        ax.errorbar(xs, ys, yerr=err, marker='o', capsize=3, label=recipe)
    if (task, 'random', 0) in tasks:
      ax.axhline(tasks[(task, 'random', 0)][0], color='grey', ls='--',
                 label='random init')
    if task in blind:
      ax.axhline(blind[task][0], color='grey', ls=':', label='blind baseline')
    ax.set_xscale('log')
    ax.minorticks_off()
    ax.set_xticks(args.corpus_sizes, [f'{c / 1000:g}k' if c >= 1000 else
                                      str(c) for c in args.corpus_sizes])
    ax.set_xlabel('pre-training pairs')
    ax.set_title(f'{task} test {TASK_METRIC[task]}')
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def parse_args(argv=None):
  ints = lambda s: tuple(int(x) for x in s.split(',') if x)
  words = lambda s: tuple(x for x in s.split(',') if x)
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', required=True, help='Where runs/, results/, data/ '
                  'and the table go.')
  ap.add_argument('--size', default='tiny', help='Model size (configs).')
  ap.add_argument('--corpus_sizes', type=ints, default=(2000, 10000, 50000))
  ap.add_argument('--seeds', type=ints, default=(0, 1, 2))
  ap.add_argument('--recipes', type=words, default=RECIPES)
  ap.add_argument('--tasks', type=words, default=TASKS)
  ap.add_argument('--pretrain_steps', type=int, default=0,
                  help='0: the size config default.')
  ap.add_argument('--finetune_steps', type=int, default=0)
  ap.add_argument('--batch_size', type=int, default=0)
  ap.add_argument('--pretrained_from', default='',
                  help="Fine-tune another grid's pre-training runs (its --out) "
                  'instead of pre-training here: the same checkpoints under '
                  'other fine-tuning settings.')
  ap.add_argument('--pretrained_lr_mult', type=float, default=0,
                  help='Fine-tuning lr multiplier of the pre-trained '
                  "parameters (0: the fine-tuning config's).")
  ap.add_argument('--finetune_examples', type=ints, default=(),
                  help='train,val,test synthetic examples per task (default: '
                  "the size config's; tiny's 64,32,32 only smoke-test).")
  ap.add_argument('--retrieval_images', type=int, default=100)
  ap.add_argument('--ablations', type=words, default=(),
                  help=f'CMAL ablations on the smallest corpus, of '
                  f'{sorted(ABLATIONS)}, or "all".')
  ap.add_argument('--no-random_init', dest='random_init',
                  action='store_false')
  ap.add_argument('--parallel', type=int, default=1)
  ap.add_argument('--delete_checkpoints', action='store_true',
                  help='Drop fine-tuning checkpoints once a run is done.')
  ap.add_argument('--commit', action='store_true',
                  help='git-commit each result JSON as its run finishes.')
  ap.add_argument('--docs', default='', help='Also write the table and plot '
                  'here (e.g. docs/).')
  args = ap.parse_args(argv)
  for recipe in args.recipes:
    if recipe not in RECIPES:
      ap.error(f'--recipes: unknown recipe {recipe!r}; one of {RECIPES}')
  if args.finetune_examples and len(args.finetune_examples) != 3:
    ap.error('--finetune_examples: three numbers, train,val,test')
  if args.ablations == ('all',):
    args.ablations = tuple(ABLATIONS)
  for ablation in args.ablations:
    if ablation not in ABLATIONS:
      ap.error(f'--ablations: unknown ablation {ablation!r}; one of '
               f'{sorted(ABLATIONS)}')
  for task in args.tasks:
    if task not in TASK_METRIC:
      ap.error(f'--tasks: unknown task {task!r}; one of {sorted(TASK_METRIC)}')
  args.argv = list(argv) if argv is not None else __import__('sys').argv[1:]
  return args


def main(argv=None):
  return run_grid(parse_args(argv))


if __name__ == '__main__':
  main()
