# python -m cmal_jax.main --config=configs/finetune.py:vqa \
#     --config.init_from=runs/pretrain --workdir=runs/vqa
"""Fine-tuning on a downstream task (synthetic world, or task files you bring).

Argument: comma-separated task (required), size (default small) and
pre-training recipe (default cmal): the model of init_from's checkpoint.
  tasks:   vqa, ve, nlvr2, rec, retrieval
  sizes:   tiny, small, base, minilm (as in configs/pretrain.py)
  recipes: as in configs/pretrain.py; semvlp's model carries the
           cross-attention sub-layer (fine-tunes single-stream; two-stream
           with --config.model.two_stream=True), semmim's reads pixels
           (fine-tunes on the records' boxes, pooled from its backbone)

  --config=configs/finetune.py:rec,base --config.init_from=runs/pretrain_base
  --config=configs/finetune.py:vqa,semvlp --config.init_from=runs/semvlp

Without init_from the model starts from random weights (the baseline row of
the README's results table).
"""

import importlib.util
import os

import ml_collections

TASKS = ('vqa', 've', 'nlvr2', 'rec', 'retrieval')
# The validation metric that picks the best checkpoint (higher is better).
BEST_METRIC = {'vqa': 'vqa_accuracy', 've': 'accuracy', 'nlvr2': 'accuracy',
               'rec': 'accuracy', 'retrieval': 'mean_recall'}
#        batch steps  lr    train  val  test (synthetic examples per split)
SIZES = {
    'tiny': (16, 20, 1e-3, 64, 32, 32),
    'small': (64, 300, 5e-4, 6000, 500, 500),
    'minilm': (64, 300, 5e-4, 6000, 500, 500),
    'base': (256, 20_000, 5e-5, 50_000, 5000, 5000),
}
# Tasks that need a longer schedule than their size's (README results
# table, `small`). NLVR2's label is an interaction of statement and both
# images ("neither" flips what "both" asks), so the first steps see no
# signal: at 300 steps every init is at chance; from the pre-trained init
# val accuracy climbs from step ~600 (0.58 at 750, 0.64 at 1250). VQA at
# 300 steps is within noise of its blind baseline (0.415 vs 0.384 on
# test); at 1000, 0.461.
STEPS = {('small', 'nlvr2'): 1500, ('minilm', 'nlvr2'): 1500,
         ('small', 'vqa'): 1000, ('minilm', 'vqa'): 1000}


def _pretrain_module():
  """configs/pretrain.py as a module: its get_config(f'{size},{recipe}')
  gives the model, data and mesh sections, which must match the checkpoint
  fine-tuning starts from, and RECIPES the recipes it knows."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'pretrain.py')
  spec = importlib.util.spec_from_file_location('cmal_pretrain_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_arg(arg, recipes):
  """'rec,base,semvlp' -> ('rec', 'base', 'semvlp'); the task is required.
  recipes: the pre-training recipes there are."""
  task, size, recipe = None, 'small', 'cmal'
  for part in filter(None, (p.strip() for p in (arg or '').split(','))):
    if part in TASKS:
      task = part
    elif part in SIZES:
      size = part
    elif part in recipes:
      recipe = part
    else:
      raise ValueError(
          f'configs/finetune.py: unknown config argument {part!r}; tasks are '
          f'{list(TASKS)}, sizes are {sorted(SIZES)}, recipes are '
          f'{list(recipes)}.')
  if task is None:
    raise ValueError('configs/finetune.py needs a task: '
                     f'configs/finetune.py:TASK with TASK one of {list(TASKS)}.')
  return task, size, recipe


def get_config(arg=None):
  pretrain = _pretrain_module()
  task, size, recipe = parse_arg(arg, pretrain.RECIPES)
  batch, steps, lr, num_train, num_val, num_test = SIZES[size]
  c = pretrain.get_config(f'{size},{recipe}')
  # The recipe whose model this is (c.recipe names the run: 'finetune');
  # report.py rebuilds the defaults from it.
  c.pretrain_recipe = recipe
  c.task = task
  c.recipe = 'finetune'
  c.total_steps = STEPS.get((size, task), steps)
  c.batch_size = batch
  # A pre-training workdir (its latest checkpoint, or init_step), or one
  # checkpoint folder (.../checkpoints/N); '' starts from random weights.
  c.init_from = ''
  c.init_step = 0  # 0: the latest.
  # Fine-tuning keeps no CMAP and no pre-training objectives.
  del c.cmap
  del c.loss
  del c.semmim
  del c.two_stream_every
  if recipe == 'semmim':
    # Pre-training's regions were the patches; the tasks' regions are their
    # records' boxes (REC picks one), pooled from the same backbone as the
    # pixel models of the other recipes pool theirs.
    defaults = pretrain.get_config(size).model.visual
    for field in ('boxes', 'roi_size', 'sampling_ratio', 'grid_size'):
      c.model.visual[field] = defaults[field]
  # Task files {task}_{split}.array_record in data.dir ('' -> the
  # synthetic world's, generated in {workdir}/data). The eval split is
  # evaluated during training and picks the best checkpoint.
  c.data.train_split = 'train'
  c.data.eval_split = 'val'
  c.finetune = ml_collections.ConfigDict(dict(
      # Each is evaluated with the best checkpoint at the end, as is the
      # eval split (RefCOCO+: ('testA', 'testB'); NLVR2: ('test1',)).
      test_splits=('test',),
      num_answers=100,  # vqa: the answer vocabulary, top-N train answers.
      # retrieval: ITC loss weight next to ITM (0: ITM only). With ITC,
      # evaluation ranks by ITC and re-ranks its top rerank_k by ITM (as
      # ALBEF does); without, it scores every pair by ITM.
      itc=1.0,
      rerank_k=16,
      # The lr of the parameters taken from init_from, as a multiple of
      # optim.lr (the task head's): smaller steps keep what pre-training
      # learnt (VQA val, small, lr 5e-4: 0.406 at 1.0, 0.436 at 0.2; the
      # README's sweep). No effect without init_from.
      pretrained_lr_mult=0.2,
  ))
  c.data.itm_neg_prob = 0.5  # retrieval: share of in-batch negatives.
  c.world.num_train = num_train
  c.world.num_eval = num_val
  c.world.num_test = num_test
  c.optim.lr = lr
  c.optim.warmup_fraction = 0.1
  c.optim.end_lr_fraction = 0.0
  c.log_every = 5 if size == 'tiny' else 25
  c.checkpoint_every = 10 if size == 'tiny' else 100
  c.eval.every_steps = 10 if size == 'tiny' else 100
  c.eval.best_metric = BEST_METRIC[task]
  c.eval.batch_size = batch
  del c.eval.retrieval_images
  return c
