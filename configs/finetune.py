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
the results table, docs/results.md).
"""

import ml_collections

from cmal_jax import config_base, configlib, recipes
from cmal_jax.data import tasks

# Per size: batch, steps, lr, and synthetic examples per split.
SIZES = {
    'tiny': dict(batch_size=16, total_steps=20, lr=1e-3, num_train=64,
                 num_val=32, num_test=32),
    'small': dict(batch_size=64, total_steps=300, lr=5e-4, num_train=6000,
                  num_val=500, num_test=500),
    'minilm': dict(batch_size=64, total_steps=300, lr=5e-4, num_train=6000,
                   num_val=500, num_test=500),
    'base': dict(batch_size=256, total_steps=20_000, lr=5e-5,
                 num_train=50_000, num_val=5000, num_test=5000),
}
# Tasks that need a longer schedule than their size's (measured:
# docs/finetuning.md, "Schedules and learning rates").
STEPS = {('small', 'nlvr2'): 1500, ('minilm', 'nlvr2'): 1500,
         ('small', 'vqa'): 1000, ('minilm', 'vqa'): 1000}


def get_config(arg=None):
  picked = config_base.parse_arg(
      arg, 'configs/finetune.py', task=(tasks.TASKS, None),
      size=(config_base.SIZES, 'small'),
      recipe=(recipes.RECIPES, recipes.DEFAULT))
  task, size, recipe = picked['task'], picked['size'], picked['recipe']
  s = SIZES[size]
  # The model, data and mesh of the recipe's checkpoint, which init_from
  # loads.
  c = config_base.base_config(size, recipe)
  c.task = task
  c.recipe = 'finetune'  # Names the run; report.py rebuilds the defaults
  c.pretrain_recipe = recipe  # from the recipe whose model this is.
  c.total_steps = STEPS.get((size, task), s['total_steps'])
  c.batch_size = s['batch_size']
  # A pre-training workdir (its latest checkpoint, or init_step), or one
  # checkpoint folder (.../checkpoints/N); '' starts from random weights.
  c.init_from = ''
  c.init_step = 0  # 0: the latest.
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
      # What ranks those candidates: 'itm_and_itc', ITM's log-probability
      # of a match plus ITC's logit sim / tau (both models' probabilities
      # multiplied; BLIP adds the two scores), so an ITM that cannot tell
      # the candidates apart leaves ITC's order; 'itm', ITM's alone
      # (ALBEF). docs/finetuning.md has the comparison.
      rerank_score='itm_and_itc',
      # retrieval: ITM's negatives. 'random': the pipeline pairs a share
      # data.itm_neg_prob of the rows with another image's caption.
      # 'hard' (ALBEF): every row is a matched pair (data.itm_neg_prob=0)
      # and each caption and each image also meets a partner of the batch
      # drawn by ITC similarity (objectives.mine_hard_negatives).
      itm_negatives='random',
      # The lr of the parameters taken from init_from, as a multiple of
      # optim.lr (the task head's): smaller steps keep what pre-training
      # learnt (docs/finetuning.md has the sweep). No effect without
      # init_from.
      pretrained_lr_mult=0.2,
  ))
  c.data.itm_neg_prob = 0.5  # retrieval: share of in-batch negatives.
  c.world.num_train = s['num_train']
  c.world.num_eval = s['num_val']
  c.world.num_test = s['num_test']
  c.optim.lr = s['lr']
  c.optim.warmup_fraction = 0.1
  c.optim.end_lr_fraction = 0.0
  c.log_every = 5 if size == 'tiny' else 25
  c.checkpoint_every = 10 if size == 'tiny' else 100
  c.eval.every_steps = 10 if size == 'tiny' else 100
  c.eval.best_metric = configlib.BEST_METRIC[task]
  c.eval.batch_size = s['batch_size']
  return c
