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

The grid's runs and their configs are grid_plan.py's, running them
grid_runner.py's, the tables and plot grid_report.py's.
"""

import argparse
import os
import sys
import traceback

from cmal_jax import cli_errors, recipes
from cmal_jax.experiments import grid_report
from cmal_jax.experiments import grid_runner
from cmal_jax.experiments.grid_plan import (
    ABLATIONS, TASK_METRIC, TASKS, grid, pretrain_out, result_path,
    run_config)

RECIPES = recipes.RECIPES
# The table's title names the recipes so.
def run_grid(args):
  out = os.path.abspath(args.out)
  runs = grid(args)
  if args.commit:  # Results a crash left uncommitted.
    grid_runner.commit_results(out, runs,
                               'data_efficiency: results of an earlier run')
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
    grid_runner.prepare_data(config)
  failed, finished = {}, len(runs) - len(todo)

  def report(run, summary=None, error=None):
    nonlocal finished
    if error is not None:  # The worker's traceback is in error.__cause__.
      traceback.print_exception(error)
      failed[run.name] = f'{type(error).__name__}: {error}'
      print(f'{run.name} FAILED: {failed[run.name]}', flush=True)
      return
    if args.commit:
      grid_runner.commit_results(out, [run], f'data_efficiency: {run.name}')
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
          report(run, grid_runner.execute(run, args, out))
        except Exception as e:  # One run's failure does not stop the grid.
          report(run, error=e)
    else:
      grid_runner.run_parallel(phase, args, out, report)
  tasks = write_report(out, runs, args)
  if failed:
    raise SystemExit(
        f'{len(failed)} run(s) failed (the rest finished; the same command '
        'retries them): ' + '; '.join(f'{k}: {v}' for k, v in failed.items()))
  return tasks


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
  """OUT/data_efficiency.md, .json and .png (and the same in --docs when
  given; grid_report.write_report) of the grid's finished runs and of the
  other recipes' finished runs in OUT. Returns the task table."""
  results = grid_report.load_results(out, runs)
  finished = len(results)
  others = other_recipes_runs(out, args)
  results.update(grid_report.load_results(out, others))
  # The recipes of the rows, paired differences and plot: the grid's, and
  # with those of the other finished runs, all in RECIPES' order.
  shown = {r.recipe for r in others}
  if shown:
    args = argparse.Namespace(**{**vars(args), 'recipes': tuple(
        r for r in RECIPES if r in args.recipes or r in shown)})
  title = ' vs '.join(recipes.get(r).title for r in args.recipes)
  also = (f' (and {len(others)} finished run(s) of '
          f'{", ".join(sorted(shown, key=RECIPES.index))} already in this '
          'folder)' if others else '')
  return grid_report.write_report(
      out, runs + others, results, args, title=title,
      status=f'{finished} of {len(runs)} runs finished{also}')


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
  cli_errors.add_verbose_flag(ap)
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
  args.argv = list(argv) if argv is not None else sys.argv[1:]
  return args


def main(argv=None):
  return run_grid(parse_args(argv))


if __name__ == '__main__':
  cli_errors.run_tool('data_efficiency', main)
