"""Orbax CheckpointManager saving the train state, the Grain iterator and
the run's signature together, so a restored run continues exactly where it
stopped, and only if it is the same kind of run."""

import os

import grain
import orbax.checkpoint as ocp

from cmal_jax import guards

ITEMS = ('state', 'data', 'signature')


def checkpoint_dir(workdir):
  return os.path.abspath(os.path.join(workdir, 'checkpoints'))


def make_manager(workdir, config):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True,
      enable_async_checkpointing=False)  # Saves are rare; keep them simple.
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS,
                               options=options)


def save(manager, step, state, data_iter, config):
  """Saves state, iterator position and signature at `step`; atomic (Orbax
  writes a temporary folder and renames it when complete), so a crash never
  leaves a checkpoint that restore would take for complete."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      signature=ocp.args.JsonSave(guards.signature(config))), force=True)
  manager.wait_until_finished()


def check_signature(manager, step, config):
  """Raises ValueError if checkpoint `step` was made by a run whose model,
  size or recipe differ from `config`'s."""
  saved = manager.restore(step, args=ocp.args.Composite(
      signature=ocp.args.JsonRestore()))['signature']
  mismatches = guards.signature_mismatches(saved, guards.signature(config))
  if mismatches:
    raise ValueError(
        f'{manager.directory}/{step} holds a checkpoint of a different run '
        f'and will not be resumed: ' + '; '.join(mismatches) + '. Use another '
        "--workdir, or --config.resume=fresh to move the old checkpoints "
        'aside and start over.')


def restore(manager, abstract_state, data_iter, config, step=None):
  """Restores the latest (or given) step into `abstract_state`'s shardings and
  moves `data_iter` to where it was. Returns the state, or None if the
  workdir holds no checkpoint."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  check_signature(manager, step, config)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iter)))
  return restored['state']
