"""Mesh, logical-axis rules and placing host batches on the mesh."""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axes every preset maps the same way: the batch over data x fsdp;
# per-head widths, sequence lengths, tag and feature widths replicated.
_COMMON_RULES = (('batch', ('data', 'fsdp')), ('kv', None), ('length', None),
                 ('tags', None), ('feature', None))
# name -> (rules for the parameter axes, default mesh shape or None when the
# preset needs one given).
PRESETS = {
    # Pure data parallel: every device holds all parameters.
    'dp': ((('embed', None), ('mlp', None), ('heads', None),
            ('vocab', None)), (-1, 1, 1)),
    # ZeRO-3: parameters and optimizer state split over `fsdp` along their
    # model width; XLA gathers each weight where it is used.
    'fsdp': ((('embed', 'fsdp'), ('mlp', None), ('heads', None),
              ('vocab', None)), (1, -1, 1)),
    # Megatron-style tensor parallel: attention heads, the MLP's hidden width
    # and the vocabulary split over `tensor`; data parallel over the rest.
    'dp_tp': ((('embed', None), ('mlp', 'tensor'), ('heads', 'tensor'),
               ('vocab', 'tensor')), None),
    # Both: width over fsdp, heads / MLP / vocabulary over tensor.
    'fsdp_tp': ((('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'),
                 ('vocab', 'tensor')), None),
}
PRESET_NAMES = tuple(PRESETS) + ('custom',)


def mesh_shape(config):
  """config.mesh.shape, or the preset's default when it is ()."""
  shape = tuple(config.mesh.shape)
  if shape:
    return shape
  if config.sharding == 'custom' or PRESETS[config.sharding][1] is None:
    raise ValueError(
        f'config.sharding={config.sharding!r} needs config.mesh.shape, e.g. '
        "--config.mesh.shape='(-1, 1, 2)' for (data, fsdp, tensor).")
  return PRESETS[config.sharding][1]


def check_config(config, num_devices):
  """Start-up checks of the sharding fields against the device count and
  the model, before anything is compiled; ValueError naming the field."""
  if config.sharding not in PRESET_NAMES:
    raise ValueError(f'config.sharding={config.sharding!r}: no such preset; '
                     f'one of {list(PRESET_NAMES)}.')
  if (config.sharding == 'custom') != bool(config.axis_rules):
    raise ValueError(
        f'config.axis_rules={tuple(config.axis_rules)!r} with '
        f'config.sharding={config.sharding!r}: rules are given exactly when '
        "the preset is 'custom'.")
  shape = resolve_shape(mesh_shape(config), num_devices)
  sizes = dict(zip(MESH_AXES, shape))
  used = {a for _, target in rules(config) for a in _mesh_axes(target)}
  for axis, size in sizes.items():
    if size > 1 and axis not in used:
      raise ValueError(
          f'config.mesh.shape={shape}: the {axis} axis has {size} devices '
          f'but config.sharding={config.sharding!r} maps nothing onto it.')
  m = config.model
  widths = {'embed': ('model.hidden_dim', m.hidden_dim),
            'heads': ('model.num_heads', m.num_heads),
            'mlp': ('model.mlp_dim', m.mlp_dim)}
  for name, target in rules(config):
    if name in widths and target is not None:
      axes = _mesh_axes(target)
      n = math.prod(sizes[a] for a in axes)
      field, width = widths[name]
      if width % n:
        raise ValueError(
            f'{field}={width} is not divisible by the {n} devices of mesh '
            f'axis {"x".join(axes)} (config.sharding={config.sharding!r}, '
            f'config.mesh.shape={shape}).')
  return shape


def _mesh_axes(target):
  """A rule's target (None, 'axis' or ('axis', ...)) as a tuple of axes."""
  return (target,) if isinstance(target, str) else tuple(target or ())


def resolve_shape(shape, num_devices):
  """A (data, fsdp, tensor) shape with its -1 filled in; checked against
  the device count."""
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f'config.mesh.shape={tuple(shape)}: needs 3 entries '
                     f'for the axes {MESH_AXES}.')
  if shape.count(-1) > 1:
    raise ValueError(f'config.mesh.shape={tuple(shape)}: at most one -1.')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f'config.mesh.shape={tuple(shape)}: {num_devices} '
                       f'devices are not divisible by {known}.')
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f'config.mesh.shape={tuple(shape)} needs '
                     f'{math.prod(shape)} devices, found {num_devices}.')
  return tuple(shape)


def make_mesh(shape, devices=None):
  """The (data, fsdp, tensor) mesh of `shape` (one -1 takes the rest) over
  `devices` (default: all)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh(resolve_shape(shape, len(devices)), MESH_AXES,
                       devices=devices, axis_types=(AxisType.Auto,) * 3)


def mesh_from_config(config, devices=None):
  """The mesh of config.mesh.shape and config.sharding, after
  check_config."""
  devices = jax.devices() if devices is None else devices
  return make_mesh(check_config(config, len(devices)), devices)


def rules(config):
  """The logical-axis rules of config.sharding, as the tuple of pairs Flax
  expects."""
  if config.sharding == 'custom':
    pairs = config.axis_rules
  else:
    # The batch rule first: Flax gives a mesh axis to the first logical axis
    # that asks for it, so activations [batch, length, embed] split their
    # batch over (data, fsdp) rather than their width over fsdp.
    pairs = _COMMON_RULES + PRESETS[config.sharding][0]
  return tuple((name, tuple(m) if isinstance(m, (list, tuple)) else m)
               for name, m in pairs)


def logical_shardings(boxed_tree, mesh, axis_rules):
  """NamedShardings for a tree of (abstract) values with logical names."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


def batch_sharding(mesh):
  """Leading (batch) dimension split over data x fsdp."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def replicated(mesh):
  return NamedSharding(mesh, P())


def global_batch(local_batch, mesh):
  """Process-local numpy batch -> global jax.Arrays sharded over the batch."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def per_process_batch_size(global_batch_size, mesh):
  """Checks the global batch divides evenly over processes and devices."""
  n_shards = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch_size % n_shards:
    raise ValueError(f'config.batch_size={global_batch_size} is not divisible '
                     f'by the {n_shards} batch shards (data x fsdp).')
  if global_batch_size % jax.process_count():
    raise ValueError(f'config.batch_size={global_batch_size} is not divisible '
                     f'by the {jax.process_count()} processes.')
  return global_batch_size // jax.process_count()


def padded_global_batches(arrays, batch_size, mesh):
  """{k: [N, ...]} host arrays, the same on every process -> (global batch,
  number of real rows) in order, for evaluation loops that must see every
  row: the last batch is padded with the last row; each process feeds its
  slice of every batch."""
  n = len(next(iter(arrays.values())))
  pi, pc = jax.process_index(), jax.process_count()
  lo, hi = pi * batch_size // pc, (pi + 1) * batch_size // pc
  for start in range(0, n, batch_size):
    idx = np.minimum(np.arange(start, start + batch_size), n - 1)[lo:hi]
    local = {k: v[idx] for k, v in arrays.items()}
    yield global_batch(local, mesh), min(batch_size, n - start)
