"""The pre-training recipes: one module per recipe in this package, found by
its file name (configs/pretrain.py:SIZE,NAME picks one).

A recipe module holds everything that makes its recipe differ from the
others; the loop, the train step and the config checks never name one.

  configure(config)         required. Its overrides of the base
                            pre-training config (configs/pretrain.py), in
                            place: loss weights, its own config section,
                            the best-checkpoint metric. config.size is set.
  configure_model(config)   optional. What its checkpoint's model needs
                            (model fields and the data shapes they imply);
                            fine-tuning configs get these too.
  make_loss(model, config, specials) -> objectives.Loss
                            optional, default objectives.pretraining_loss:
                            its corruption, losses and hooks (prepare,
                            after_update) and its extra train state.
  init_inputs(inputs, config)
                            optional. The model inputs for init, with the
                            ones only this recipe feeds added.
  check(config)             optional. Raises ValueError naming the first
                            invalid field of what the recipe adds.
  TITLE                     optional. Its name in reports and plots
                            (default: the module's name).

docs/recipes.md has a worked example of adding one.
"""

import dataclasses
import importlib
import pkgutil
from typing import Callable

from cmal_jax import objectives


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A recipe module's hooks, with the defaults of the ones it leaves out."""
  name: str
  title: str
  configure: Callable
  configure_model: Callable = lambda config: None
  make_loss: Callable = objectives.pretraining_loss
  init_inputs: Callable = lambda inputs, config: inputs
  check: Callable = lambda config: None

  @classmethod
  def from_module(cls, module):
    name = module.__name__.rsplit('.', 1)[-1]
    hooks = {f.name: getattr(module, f.name)
             for f in dataclasses.fields(cls)[2:] if hasattr(module, f.name)}
    if 'configure' not in hooks:
      raise TypeError(f'{module.__file__}: a recipe module needs '
                      'configure(config).')
    return cls(name=name, title=getattr(module, 'TITLE', name), **hooks)


def _discover():
  """{name: Recipe} of the package's modules, the default recipe first."""
  names = sorted(m.name for m in pkgutil.iter_modules(__path__)
                 if not m.name.startswith('_'))
  names.sort(key=lambda n: n != DEFAULT)
  return {n: Recipe.from_module(importlib.import_module(f'{__name__}.{n}'))
          for n in names}


DEFAULT = 'cmal'
REGISTRY = _discover()
RECIPES = tuple(REGISTRY)  # The one list of recipe names.


def get(name):
  """The Recipe called `name`; a ValueError lists the known ones."""
  if name not in REGISTRY:
    raise ValueError(f'config.recipe={name!r}: unknown recipe; one of '
                     f'{list(RECIPES)} (the modules of cmal_jax/recipes/).')
  return REGISTRY[name]
