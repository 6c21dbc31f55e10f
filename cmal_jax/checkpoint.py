"""Orbax CheckpointManager saving the train state and the Grain iterator
together, so a restored run continues exactly where it stopped."""

import os

import grain
import orbax.checkpoint as ocp


def make_manager(workdir, config):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True,
      enable_async_checkpointing=False)  # Saves are rare; keep them simple.
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      item_names=('state', 'data'), options=options)


def save(manager, step, state, data_iter):
  """Saves state and iterator position at `step`; atomic (Orbax renames a
  finished temporary folder), so a crash never leaves a half checkpoint."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter)), force=True)
  manager.wait_until_finished()


def restore(manager, abstract_state, data_iter, step=None):
  """Restores the latest (or given) step into `abstract_state`'s shardings and
  moves `data_iter` to where it was. Returns the state, or None if the
  workdir holds no checkpoint."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iter)))
  return restored['state']

