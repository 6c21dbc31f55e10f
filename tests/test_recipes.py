"""The recipes registry (cmal_jax/recipes/): one module per recipe, found by
file name; a recipe added as a new file trains with no other file touched."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from cmal_jax import configlib, recipes
from configs import finetune as finetune_config
from configs import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registry_holds_every_recipe_module_default_first():
  assert recipes.RECIPES == ('cmal', 'cmcl', 'mlm_itm', 'semmim', 'semvlp')
  assert recipes.DEFAULT == 'cmal' and pretrain.get_config().recipe == 'cmal'
  with pytest.raises(ValueError, match=r"config\.recipe='contrastive': "
                     r"unknown recipe; one of \['cmal', 'cmcl'"):
    recipes.get('contrastive')


@pytest.mark.parametrize('name', recipes.RECIPES)
def test_each_recipe_config_validates(name):
  c = pretrain.get_config(f'tiny,{name}')
  configlib.validate(c)
  f = finetune_config.get_config(f've,tiny,{name}')
  configlib.validate(f)
  # Fine-tuning carries the recipe's model, not its objectives.
  assert f.model == c.model or name == 'semmim'
  assert 'loss' not in f and 'cmap' not in f and f.pretrain_recipe == name


def test_recipe_overrides_are_its_own():
  """What each recipe turns on, against the base config (mlm_itm's)."""
  base = pretrain.get_config('tiny,mlm_itm')
  weights = lambda c: {k: v for k, v in configlib.loss_weights(c).items()
                       if v}
  assert weights(base) == {'mlm': 1.0, 'itm': 1.0}
  assert weights(pretrain.get_config('tiny,cmal')) == {
      'amc': 1.0, 'mlm': 1.0, 'itm': 1.0}
  assert weights(pretrain.get_config('tiny,cmcl')) == {
      'mlm': 1.0, 'itm': 1.0, 'itc': 1.0}
  assert weights(pretrain.get_config('tiny,semvlp')) == {
      'mlm': 1.0, 'itm': 1.0, 'mrc': 1.0}
  assert weights(pretrain.get_config('tiny,semmim')) == {
      'mlm': 1.0, 'itm': 1.0, 'itc': 1.0, 'mim': 1.0, 'agreement': 1.0}
  assert 'semmim' not in base and 'two_stream_every' not in base
  assert not base.cmap.enabled and pretrain.get_config('tiny').cmap.enabled


def test_a_recipe_module_needs_configure():
  module = type(sys)('cmal_jax.recipes.broken')
  module.__file__ = 'cmal_jax/recipes/broken.py'
  with pytest.raises(TypeError, match=r'broken\.py: a recipe module needs '
                     r'configure\(config\)'):
    recipes.Recipe.from_module(module)


# A recipe of its own: ITM alone plus a penalty on the ITM logits, with its
# own config section and check, in one new file.
THROWAWAY = textwrap.dedent('''
    """ITM plus a logit penalty: a recipe written in one file."""
    import functools

    import jax.numpy as jnp
    import ml_collections

    from cmal_jax import objectives


    def configure(config):
      config.loss.mlm = 0.0
      config.throwaway = ml_collections.ConfigDict(dict(penalty=0.5))


    def check(config):
      if config.throwaway.penalty < 0:
        raise ValueError('config.throwaway.penalty: must be >= 0')


    def logit_penalty(config, outputs, targets, denominators, total):
      penalty = jnp.mean(jnp.square(outputs['itm_logits']))
      return (total + config.throwaway.penalty * penalty,
              {'loss_logit_penalty': penalty})


    def make_loss(model, config, specials):
      return objectives.pretraining_loss(
          model, config, specials,
          extra_losses=functools.partial(logit_penalty, config))
''')


def test_a_new_recipe_file_trains_without_other_edits(tmp_path, world_dir):
  """A copy of the package plus recipes/throwaway.py: the config argument
  finds it, its check runs, and it trains and evaluates."""
  root = tmp_path / 'repo'
  ignore = shutil.ignore_patterns('__pycache__')
  for part in ('cmal_jax', 'configs'):
    shutil.copytree(os.path.join(ROOT, part), root / part, ignore=ignore)
  (root / 'cmal_jax' / 'recipes' / 'throwaway.py').write_text(THROWAWAY)
  env = dict(os.environ, PYTHONPATH=str(root))
  base = [sys.executable, '-m', 'cmal_jax.main',
          '--config=configs/pretrain.py:tiny,throwaway',
          f'--config.data.dir={world_dir}', '--config.total_steps=4',
          '--config.log_every=2', '--config.model.text_layers=0',
          '--config.model.vision_layers=0', '--config.model.unified_layers=1']
  bad = subprocess.run(base + ['--config.throwaway.penalty=-1',
                               f'--workdir={tmp_path / "bad"}'],
                       cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode != 0
  assert 'config.throwaway.penalty: must be >= 0' in bad.stderr
  workdir = tmp_path / 'run'
  run = subprocess.run(base + [f'--workdir={workdir}'], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  config = json.loads((workdir / 'config.json').read_text())
  assert config['recipe'] == 'throwaway'
  assert config['throwaway'] == {'penalty': 0.5}
  lines = [json.loads(l) for l in
           (workdir / 'metrics.jsonl').read_text().splitlines()]
  train = [l for l in lines if 'loss_logit_penalty' in l]
  assert [l['step'] for l in train] == [2, 4]
  assert all(l['loss_logit_penalty'] > 0 for l in train)
  assert all('loss_mlm' not in l for l in train)
  results = json.loads((workdir / 'eval.json').read_text())
  assert 0 <= results['itm_acc'] <= 1
