"""Logical axis names: the contract between the model and the mesh.

Parameters carry names through `init`, activations through `constrain`;
`config.axis_rules` maps names to mesh axes (`data`, `fsdp`, `tensor`).
Names: batch, length, embed, mlp, heads, kv, vocab, tags, feature.
"""

import flax.linen as nn

bert_init = nn.initializers.normal(stddev=0.02)  # BERT's initializer_range.


def init(initializer, names):
  """Wraps an initializer so the parameter carries logical axis `names`."""
  return nn.with_logical_partitioning(initializer, names)


def constrain(x, names):
  """Sharding hint for an activation; a no-op outside a mesh with rules."""
  return nn.with_logical_constraint(x, names)
