"""Mesh, logical-axis rules and placing host batches on the mesh."""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')


def make_mesh(shape, devices=None):
  """Builds the (data, fsdp, tensor) mesh; one -1 entry takes the rest."""
  devices = jax.devices() if devices is None else devices
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f'config.mesh.shape={tuple(shape)}: needs 3 entries '
                     f'for the axes {MESH_AXES}.')
  if shape.count(-1) > 1:
    raise ValueError(f'config.mesh.shape={tuple(shape)}: at most one -1.')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f'config.mesh.shape={tuple(shape)}: {len(devices)} '
                       f'devices are not divisible by {known}.')
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f'config.mesh.shape={tuple(shape)} needs '
                     f'{math.prod(shape)} devices, found {len(devices)}.')
  return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                       axis_types=(AxisType.Auto,) * 3)


def rules(config):
  """config.axis_rules as the tuple-of-pairs Flax expects."""
  return tuple((name, tuple(m) if isinstance(m, (list, tuple)) else m)
               for name, m in config.axis_rules)


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
