"""The pre-training step in the PyTorch mirror: the same model, weights,
batch, objectives and optimizer (global-norm clip, then AdamW with the same
decay mask and schedule value) as the JAX step, for side-by-side timing.

The JAX step samples its corruption (CMAP actions, MLM positions) on device
inside the step; the PyTorch step is fed inputs and targets corrupted once
by `objectives.prepare_inputs`, so it does slightly less work per step; and
it scores ITM on the CMAP pass (loss.itm_inputs='corrupted'), without the
JAX step's label-blind ITM pass.
"""

import jax
import numpy as np
import torch

from cmal_jax.export import torch_model, torch_objectives
from cmal_jax.model import torch_names


def to_torch(tree):
  """A dict of arrays (dicts nested, as inputs['moved']) -> the same of CPU
  tensors (bool stays bool)."""
  return {k: to_torch(v) if isinstance(v, dict) else torch.as_tensor(
      np.array(v)) for k, v in tree.items()}


def no_decay(name):
  """train_step.decay_mask's rule on PyTorch names: no weight decay for biases,
  LayerNorm, scales and the [MASK] vector."""
  last = name.rsplit('.', 1)[-1]
  return (last in ('bias', 'mask_vector', 'text_scale', 'vision_scale',
                   'itc_log_scale') or 'LayerNorm' in name)


def make_torch_step(export_config, params, config, lr, compile_mode=None):
  """(model, step(inputs, targets) -> loss) for the mirror of `params`.

  export_config: export.export_config's dict; params: the JAX parameters;
  compile_mode: None (eager) or a torch.compile mode ('default', ...).
  """
  model = torch_model.CMAL(export_config)
  state = torch_names.to_torch_state(jax.device_get(params))
  model.load_state_dict({k: torch.as_tensor(np.array(v))
                         for k, v in state.items()})
  model.train()  # Dropout on, as in the JAX train step.
  named = list(model.named_parameters())
  o = config.optim
  optimizer = torch.optim.AdamW(
      [{'params': [p for n, p in named if not no_decay(n)],
        'weight_decay': o.weight_decay},
       {'params': [p for n, p in named if no_decay(n)], 'weight_decay': 0.0}],
      lr=lr, betas=(o.b1, o.b2), eps=1e-8)

  def loss_fn(inputs, targets):
    loss, _ = torch_objectives.compute_losses(model(inputs), targets,
                                              config.loss)
    return loss

  forward = torch.compile(loss_fn, mode=compile_mode) if compile_mode else (
      loss_fn)

  def step(inputs, targets):
    optimizer.zero_grad(set_to_none=True)
    loss = forward(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
    optimizer.step()
    return loss.detach()

  return model, step
