"""Orbax CheckpointManager saving the train state, the Grain iterator and
the run's signature and identity together, so a restored run continues
exactly where it stopped, and only if it is the same run
(run_identity.py)."""

import dataclasses
import json
from typing import Any

from flax import traverse_util
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from etils import epath

from cmal_jax import run_identity, storage, train_step
from cmal_jax.logs import log

ITEMS = ('state', 'data', 'signature', 'identity')


class DataIteratorHandler(grain.checkpoint.CheckpointHandler):
  """Grain's iterator handler, plus restoring under another process count.

  Grain writes one state per process (process_<i>-of-<n>.json). Our
  pipeline's local batch k is global batch k on every process
  (pipeline.process_rows), so all saved states agree and any process may
  take one: a run resumed on other hardware continues at the same global
  batch. Differing states (a pipeline without that property) are refused.
  Under data.read='own_shards' each process's state is of its own shards:
  the run identity refuses another process count before this restore.
  """

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    mine = directory / (f'process_{jax.process_index()}-of-'
                        f'{jax.process_count()}.json')
    if mine.exists():
      return super().restore(directory, item=item)
    saved = sorted(directory.glob('process_*-of-*.json'))
    states = {path.read_text() for path in saved}
    if len(states) != 1:
      raise ValueError(
          f'{directory}: the data iterator was saved by '
          f'{len(saved)} processes in {len(states)} different states; it '
          f'cannot be restored in a run of {jax.process_count()} processes.')
    item.set_state(json.loads(states.pop()))
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any


def checkpoint_dir(workdir):
  """workdir/checkpoints: absolute when local, as given when gs://."""
  return str(storage.workdir_path(workdir, 'checkpoints'))


def make_manager(workdir, config):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True,
      enable_async_checkpointing=False)  # Saves are rare; keep them simple.
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS,
                               options=options)


def save(manager, step, state, data_iter, config):
  """Saves state, iterator position, signature and identity at `step`;
  atomic (Orbax
  writes a temporary folder and renames it when complete), so a crash never
  leaves a checkpoint that restore would take for complete."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=DataSave(data_iter),
      signature=ocp.args.JsonSave(run_identity.signature(config)),
      identity=ocp.args.JsonSave(run_identity.identity(config))), force=True)
  manager.wait_until_finished()


def check_resume(manager, step, config):
  """Checks that `config` may resume checkpoint `step`; returns the identity
  changes it accepted ({field: (checkpoint value, config value)}, empty when
  none).

  Raises ValueError if the checkpoint was made by a run whose model, size or
  recipe differ (never resumable), or whose identity differs and
  config.resume is not 'allow_changes'.
  """
  where = f'{manager.directory}/{step}'
  has_identity = (epath.Path(manager.directory) / str(step) /
                  'identity').exists()
  saved = manager.restore(step, args=ocp.args.Composite(
      signature=ocp.args.JsonRestore(),
      **({'identity': ocp.args.JsonRestore()} if has_identity else {})))
  mismatches = run_identity.signature_mismatches(
      saved['signature'], run_identity.signature(config))
  if mismatches:
    raise ValueError(
        f'{where} holds a checkpoint of a different run '
        f'and will not be resumed: ' + '; '.join(mismatches) + '. Use another '
        "--workdir, or --config.resume=fresh to move the old checkpoints "
        'aside and start over.')
  if not has_identity:
    log(f'{where} predates the run identity: only its model was checked.')
    return {}
  changes = run_identity.identity_changes(saved['identity'],
                                          run_identity.identity(config))
  if changes and config.resume != 'allow_changes':
    raise ValueError(
        f'{where} was made with another config, so resuming would change how '
        f'its weights are made: {run_identity.describe_changes(changes)}. '
        "Run with the checkpoint's values, add --config.resume=allow_changes "
        'to accept the change (recorded in run_info.json; the old config.json '
        'is kept), use another --workdir, or --config.resume=fresh to move '
        'the old checkpoints aside and start over.')
  return changes


def restore(manager, state, data_iter, step=None):
  """Restores the latest (or given) step into `state`'s layout and shardings
  and moves `data_iter` to where it was. Returns the state, or None if the
  workdir holds no checkpoint. Call check_resume first (train.py does,
  before it builds the state)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  where = f'{manager.directory}/{step}'
  saved = ocp.StandardCheckpointHandler().metadata(
      epath.Path(manager.directory) / str(step) / 'state')
  target, finish = _saved_layout(state, saved, where)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target),
      data=DataRestore(data_iter)))['state']
  return finish(restored)


def _saved_layout(state, saved, where):
  """-> (target, finish): the restore target in the layout of the checkpoint
  whose state metadata is `saved`, and the function that brings the
  restored state back to `state`'s layout (which the compiled step needs).

  The layouts differ where the checkpoint predates a data counter (the
  counter starts at 0: it counted nothing then) or keeps one this job does
  not count (dropped), and where the dtype changed on resume: only float16
  carries a loss scale (train_step.ScaledTrainState), which is then dropped
  or started afresh.
  """
  replicated = state.nonfinite_skips.sharding
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                            sharding=replicated)
  saved_stats = set(saved['data_stats'])
  new_stats = sorted(set(state.data_stats) - saved_stats)
  old_stats = sorted(saved_stats - set(state.data_stats))
  target = state.replace(data_stats={
      **{k: v for k, v in state.data_stats.items() if k in saved_stats},
      **{k: abstract(state.nonfinite_skips) for k in old_stats}})
  if new_stats or old_stats:
    log(f'{where}: data counters {new_stats} start at 0 (the checkpoint '
        f'predates them); {old_stats} are not counted by this job: dropped.')
  saved_scale = 'loss_scale' in saved
  scale = getattr(state, 'loss_scale', None)
  if saved_scale and scale is None:
    log(f'{where} carries a float16 loss scale; this run is not float16: '
        'dropped.')
    target = train_step.with_loss_scale(target, jax.tree.map(
        abstract, train_step.initial_loss_scale()))
  elif scale is not None and not saved_scale:
    log(f'{where} carries no loss scale (not float16): this float16 run '
        'starts a fresh one.')
    target = train_step.without_loss_scale(target)

  def finish(restored):
    restored = restored.replace(data_stats={
        k: restored.data_stats.get(k, v) for k, v in state.data_stats.items()})
    if saved_scale and scale is None:
      return train_step.without_loss_scale(restored)
    if scale is not None and not saved_scale:
      return train_step.with_loss_scale(restored, scale)
    return restored

  return target, finish


# ------------------------------------------------- fine-tuning: init_from

def load_pretrained_params(path, step=None, what='init_from'):
  """The parameters of a training checkpoint, as host arrays, and where
  they came from ('.../checkpoints/N').

  path: a workdir (its latest checkpoint, or `step`), its checkpoints/
  folder, or one step's folder (.../checkpoints/N). `what` starts the error
  messages (the flag that named the path).
  """
  path = storage.workdir_path(path)  # May be a pod's gs:// workdir.
  if not path.is_dir():
    raise FileNotFoundError(f'{what}: {path} is not a directory (a '
                            'training workdir or checkpoints/N).')
  if (path / 'checkpoints').is_dir():  # A workdir.
    path = path / 'checkpoints'
  elif path.name.isdigit() and step is None:  # checkpoints/N.
    path, step = path.parent, int(path.name)
  path = str(path)
  manager = ocp.CheckpointManager(path, item_names=ITEMS)
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(
          f'{what}: {path} holds no checkpoint'
          + (f' at step {step}' if step is not None else '')
          + f' (steps: {manager.all_steps()}).')
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))['state']
  finally:
    manager.close()
  return state['params'], f'{path}/{step}'


def merge_pretrained(params, pretrained, names, source='checkpoint'):
  """`params` with the subtrees `names` taken from `pretrained`.

  Every leaf under those names must exist in both with the same shape;
  otherwise a ValueError names the parameter and both shapes. Returns
  (merged params, number of leaves taken).
  """
  flat = traverse_util.flatten_dict(params, sep='/')
  loaded = traverse_util.flatten_dict(pretrained, sep='/')
  problems, taken = [], 0
  for key, value in flat.items():
    if key.split('/')[0] not in names:
      continue
    if key not in loaded:
      problems.append(f'{key}: missing in the {source}')
      continue
    if tuple(loaded[key].shape) != tuple(value.shape):
      problems.append(f'{key}: {source} {tuple(loaded[key].shape)}, model '
                      f'{tuple(value.shape)}')
      continue
    flat[key] = np.asarray(loaded[key], dtype=value.dtype)
    taken += 1
  if problems:
    raise ValueError(
        f'init_from: the {source} does not fit this model ('
        f'{len(problems)} parameter(s)): ' + '; '.join(problems[:5])
        + ('; ...' if len(problems) > 5 else ''))
  return traverse_util.unflatten_dict(flat, sep='/'), taken


def best_dir(workdir):
  """workdir/best: absolute when local, as given when gs://."""
  return str(storage.workdir_path(workdir, 'best'))


class BestCheckpoint:
  """Keeps the parameters of the best evaluation so far (higher is better)
  in workdir/best, described by workdir/best.json; survives resumes."""

  def __init__(self, workdir, metric):
    self.metric = metric
    self.json_path = epath.Path(workdir) / 'best.json'
    self.value, self.step = None, None
    if self.json_path.exists():
      saved = json.loads(self.json_path.read_text())
      self.value, self.step = saved['value'], saved['step']
    self.manager = ocp.CheckpointManager(
        best_dir(workdir), item_names=('params',),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False))

  def update(self, step, results, params):
    value = float(results[self.metric])
    if self.value is not None and value <= self.value:
      return
    # A finished run evaluated again (another evaluation field) may score
    # the step already kept higher: the same parameters, a new value.
    if step != self.step:
      self.manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params)), force=True)
      self.manager.wait_until_finished()
    self.value, self.step = value, step
    if jax.process_index() == 0:
      storage.write_text_atomic(self.json_path, json.dumps(
          dict(metric=self.metric, value=value, step=step)))

  def restore(self, params):
    """The best parameters, in the shardings of `params` (same tree)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        params)
    return self.manager.restore(self.step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))['params']

  def close(self):
    self.manager.close()
