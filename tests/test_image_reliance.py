"""experiments/image_reliance.py: the attention mass it reports is the one
the probabilities put on the real region slots."""

import jax.numpy as jnp
import numpy as np
import pytest

from cmal_jax.experiments import image_reliance


def test_attention_mass_on_the_regions_counts_real_slots_only():
  # One example, 2 heads, T = 4 ([CLS], two words, padding), R = 3 (two
  # real regions, one padding): L = 7.
  inputs = {'input_ids': jnp.zeros((1, 4), jnp.int32),
            'text_mask': jnp.array([[1, 1, 1, 0]]),
            'region_mask': jnp.array([[1, 1, 0]])}
  probs = np.zeros((1, 2, 7, 7), np.float32)
  probs[0, 0, 0] = [0.5, 0, 0, 0, 0.25, 0.25, 0]   # [CLS], head 0: 0.5.
  probs[0, 1, 0] = [0, 0, 0, 0, 0.1, 0.1, 0.8]     # Head 1: 0.2 (not the
  probs[0, :, 1] = [0, 0, 0, 0, 1.0, 0, 0]         # padding slot's 0.8).
  probs[0, :, 2] = [0, 1.0, 0, 0, 0, 0, 0]         # Word 2: 0.
  probs[0, :, 3] = [0, 0, 0, 0, 0, 1.0, 0]         # Padding: not counted.
  layer = {'attention': {'attention_probs': (jnp.asarray(probs),)}}
  got = image_reliance.attention_to_regions(
      {'unified': {'layer_0': layer, 'layer_1': layer}}, inputs, 2)
  np.testing.assert_allclose(got['cls_on_regions'], [[0.35, 0.35]])
  np.testing.assert_allclose(got['text_on_regions'], [[0.5, 0.5]])
  # A uniform reader: 2 regions of 5 real slots.
  np.testing.assert_allclose(got['uniform_share'], [0.4])


def test_checkpoint_steps_lists_the_saved_steps_in_order(tmp_path):
  for step in (300, 100, 25):
    (tmp_path / 'checkpoints' / str(step)).mkdir(parents=True)
  (tmp_path / 'checkpoints' / 'tmp').mkdir()
  assert image_reliance.checkpoint_steps(str(tmp_path), 'all') == [25, 100,
                                                                   300]
  assert image_reliance.checkpoint_steps(str(tmp_path), '100,300') == [100,
                                                                       300]
  assert image_reliance.checkpoint_steps(str(tmp_path), 'best') == ['best']
  (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='holds no checkpoint'):
    image_reliance.checkpoint_steps(str(tmp_path / 'empty'), 'all')
