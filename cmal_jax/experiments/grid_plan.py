"""The data-efficiency grid's runs (data_efficiency.py): which runs there
are, each one's config, and where its data, workdir and result live.

A run is a pre-training (seed, recipe, corpus size[, ablation]) or a
fine-tuning of one on a task (or of a random init); every run is its own
workdir under OUT/runs and leaves OUT/results/NAME.json (summarise) when it
is done.
"""

import dataclasses
import os

from cmal_jax import configlib
from cmal_jax.model.pixels import reads_pixels
from configs import finetune as finetune_config
from configs import pretrain as pretrain_config

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
    # The shortcut fixes (docs/controls.md): all four off, and the one the
    # issue leaves to the downstream figures (the paper's single UMSE pass).
    'paper': pretrain_config.PAPER_BEHAVIOUR,
    'moved_place_carried': {'model.moved_place': 'carried'},
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
                             pixels=reads_pixels(c))
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
                             pixels=reads_pixels(c))
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
    keep = ('amc_pair_acc', 'amc_pair_acc_all_swapped',
            'amc_pair_chance_all_swapped', 'amc_pair_acc_place_scrambled',
            'amc_pair_acc_place_only', 'amc_pair_chance_place_only',
            'itm_acc', 'itm_acc_label_blind', 'itm_acc_same_anchors',
            'mlm_acc', 'retrieval_t2i_r1', 'retrieval_i2t_r1',
            'retrieval_itc_t2i_r1', 'retrieval_itc_i2t_r1')
    out['metrics'] = {k: results[k] for k in keep if k in results}
  else:
    metric = TASK_METRIC[run.task]
    test = next(k for k in results if k.startswith('test'))
    out['metrics'] = {'val': results['val'][metric],
                      'test': results[test][metric], 'metric': metric,
                      'best_step': results['best_step']}
  return out

