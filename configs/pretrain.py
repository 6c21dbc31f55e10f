# python -m cmal_jax.main --config=configs/pretrain.py --workdir=runs/pretrain
"""CMAL pre-training on the embedded synthetic world (or records you bring).

Argument: comma-separated size, recipe and behaviour, all optional.
  sizes:   tiny (unit tests), small (default; a CPU run), base (accelerators),
           minilm (small's data, the unified encoder from MiniLM-L6-H384);
           cmal_jax/config_base.py SIZES
  recipes: the modules of cmal_jax/recipes/ (docs/recipes.md):
           cmal (default: AMC + MLM + ITM), cmcl (ITC + MLM + ITM, CMAP off),
           mlm_itm (MLM + ITM alone, CMAP off: the baseline of both),
           semvlp (MLM + masked object prediction + ITM, alternating single-
           and two-stream steps through a cross-attention sub-layer;
           docs/semvlp.md), semmim (reads pixels: text-guided masked image
           modelling against a momentum encoder, with prototype agreement,
           MLM, ITM and ITC; docs/semmim.md)
  behaviour: fixed (default: the shortcuts of docs/controls.md closed) or
           paper (the ablation: the four fixes off in PAPER_BEHAVIOUR, the
           behaviour before the fixes)

  --config=configs/pretrain.py:base,cmcl --config.total_steps=10000
"""

import ml_collections

from cmal_jax import config_base, recipes

# The ablation of docs/controls.md: each shortcut's fix turned off. ITM then
# reads the CMAP pass throughout, so it has no warm-up on it (configlib
# refuses one).
PAPER_BEHAVIOUR = {'model.moved_place': 'carried', 'cmap.hide_inputs': False,
                   'loss.amc_tag_at': 'all', 'loss.itm_inputs': 'corrupted',
                   'loss.itm_corrupted_warmup': 0.0}
BEHAVIOURS = ('fixed', 'paper')


def get_config(arg=None):
  picked = config_base.parse_arg(
      arg, 'configs/pretrain.py', size=(config_base.SIZES, 'small'),
      recipe=(recipes.RECIPES, recipes.DEFAULT),
      behaviour=(BEHAVIOURS, 'fixed'))
  c = config_base.base_config(picked['size'], picked['recipe'])
  c.task = 'pretrain'
  c.recipe = picked['recipe']

  # CMAP: anchor point masking and swap feature filling (the cmal recipe
  # turns it on).
  c.cmap = ml_collections.ConfigDict(dict(
      enabled=False,
      select_prob=0.5,
      swap_prob=0.8,
      mask_prob=0.1,  # The rest (0.1) keeps the anchor as it is.
      # The UMSE pass whose features stay does not read a hidden anchor:
      # MASK anchors (and SWAP anchors when model.moved_place='none') read
      # [MASK] pieces and a zeroed region, so their neighbours cannot carry
      # them. False: the ablation, every anchor read as it is.
      hide_inputs=True,
  ))
  # Objective weights (0 turns one off; a recipe sets its own) and their
  # settings (configlib.LOSS_SETTINGS).
  c.loss = ml_collections.ConfigDict(dict(
      amc=0.0,
      amc_targets='both',  # 'pairing', 'label' or 'both'.
      # Where the AMC tag is scored: 'unswapped', region slots that still
      # hold their region or the mask vector; 'all' (the ablation) also the
      # swapped ones, which hold the anchor word: the tag is then read off.
      amc_tag_at='unswapped',
      mlm=1.0,
      mlm_prob=0.15,
      # The chance that MLM takes the word just before an anchor (its
      # modifier: 'red' in 'a red cube') among its mlm_prob share first:
      # a word that only the named object's region can tell, so MLM must
      # read the image there. 0: MLM's positions are uniform.
      mlm_modifier_prob=0.0,
      itm=1.0,
      # What ITM reads: 'label_blind', a pass of the uncorrupted pair with
      # CMAP off; 'corrupted' (the ablation), the CMAP pass, whose swaps
      # tell the label (a mismatched pair has fewer anchors).
      itm_inputs='label_blind',
      # Label-blind ITM's warm-up: the fraction of total_steps in which it
      # reads the CMAP pass instead (the anchor cues get it off its ln 2
      # plateau; evaluation and the rest of training read the label-blind
      # pass). 0: none (docs/controls.md, "ITM's warm-up"). Label-blind ITM
      # only: with itm_inputs='corrupted' it must be 0 (configlib).
      itm_corrupted_warmup=0.5,
      # Masked region classification: predict a masked region's tag
      # (SemVLP's masked object prediction).
      mrc=0.0,
      mrc_prob=0.15,
      itc=0.0,
      # MLM and MRC may mask anchor words and regions (needs CMAP off).
      # False: they skip them (docs/design.md: anchors are AMC's), kept by
      # the baselines so their rows stay comparable with CMAL's; SemVLP's
      # and SemMIM's papers mask any word and object.
      mask_anchors=False,
  ))
  c.eval.retrieval_images = 32 if c.size == 'tiny' else 100
  # The best checkpoint (workdir/best, best.json) is kept by this metric
  # (higher is better), over periodic and final evaluations.
  c.eval.best_metric = 'itm_acc'
  recipes.get(c.recipe).configure(c)
  if picked['behaviour'] == 'paper':
    c.update_from_flattened_dict(PAPER_BEHAVIOUR)
  return c
