"""RoIAlign (Mask R-CNN) in JAX, with torchvision's semantics.

Boxes are (x1, y1, x2, y2) normalised to [0, 1] of the image, and the
feature map is taken to cover the image exactly, so a box edge x lands at
x * W in feature-map units (cell j spans [j, j + 1)). That is
torchvision.ops.roi_align on boxes given in feature-map cells with
spatial_scale=1, i.e. on image-pixel boxes with spatial_scale = W / W_image
when the map's stride is the same along both axes.

torchvision's CPU kernel (csrc/ops/cpu/roi_align_kernel.cpp and
roi_align_common.h), which this module follows, per box and axis:
  - aligned=True shifts both edges by -0.5 (cell j's centre is at j, the
    "pixel-centre" convention); aligned=False does not shift, but widens a
    box narrower than one cell (or reversed) to exactly one cell:
    size = max(x2 - x1, 1). With aligned=True nothing is widened: a
    zero-size box samples one point, a reversed one samples backwards.
  - Each of the P bins has size / P; it holds sampling_ratio samples per
    axis at start + p * bin + (i + 0.5) * bin / sampling_ratio, and its
    output is the plain mean of its sampling_ratio**2 bilinear samples.
  - A sample at y < -1 or y > H (or x < -1 or x > W; NaN too) contributes 0
    but still counts in the mean. Otherwise y <= 0 is clamped to 0, and
    y >= H - 1 reads row H - 1 alone (no interpolation past the last row):
    samples up to one cell outside the map take the border's value.
  - Only sampling_ratio > 0 is supported: torchvision's adaptive mode
    (sampling_ratio <= 0, ceil(size / P) samples per bin) has a per-box,
    data-dependent sample count, which static shapes cannot express.
Gradients reach the feature map (as torchvision's backward); the boxes are
data and get none.

Bilinear weights are computed in float32 whatever the feature map's dtype;
the weighted sums accumulate in float32 and are returned in the feature
map's dtype. Batching is jax.vmap over images, so the functions nest under
further vmaps and jit.
"""

import functools

import jax
import jax.numpy as jnp


# Arguments that fix the output's shape or the sampling: part of the trace.
_STATIC = ('output_size', 'sampling_ratio', 'aligned')


def _check_args(feature_map, boxes, output_size, sampling_ratio):
  """Static checks; returns output_size as (P_h, P_w)."""
  if feature_map.ndim != 4:
    raise ValueError(f'feature_map must be [B, H, W, C], got shape '
                     f'{feature_map.shape}.')
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or (boxes.shape[0]
                                                 != feature_map.shape[0]):
    raise ValueError(f'boxes must be [B, R, 4] with B={feature_map.shape[0]}'
                     f', got shape {boxes.shape}.')
  if sampling_ratio <= 0:
    raise ValueError(
        f'sampling_ratio={sampling_ratio}: must be > 0 (torchvision\'s '
        'adaptive sampling needs data-dependent shapes).')
  if isinstance(output_size, int):
    output_size = (output_size, output_size)
  return tuple(int(p) for p in output_size)


def axis_taps(lo, hi, length, num_bins, sampling_ratio, aligned):
  """Bilinear taps along one axis for every bin and sample of every box.

  lo, hi [R]: a box's edges along this axis in feature-map units; length:
  the map's size along it. Returns (low, high) int32 [R, P, S], the two
  neighbouring rows (or columns) each sample reads, and (w_low, w_high)
  float32 [R, P, S], their weights: zero for a sample outside the map by
  more than one cell. A 2-D sample's weights are products of its two axes'
  weights (torchvision's w1..w4 = hy*hx, hy*lx, ly*hx, ly*lx), and it is
  outside the map exactly when it is outside along either axis.
  """
  lo = lo.astype(jnp.float32)
  hi = hi.astype(jnp.float32)
  offset = 0.5 if aligned else 0.0
  start = lo - offset
  size = (hi - offset) - start
  if not aligned:
    size = jnp.maximum(size, 1.0)  # Malformed boxes become one cell wide.
  bin_size = (size / num_bins)[:, None, None]
  p = jnp.arange(num_bins, dtype=jnp.float32)[:, None]
  i = jnp.arange(sampling_ratio, dtype=jnp.float32)[None, :]
  # torchvision's expression, in its order of operations.
  pos = (start[:, None, None] + p * bin_size
         + (i + 0.5) * bin_size / sampling_ratio)  # [R, P, S]
  inside = (pos >= -1.0) & (pos <= length)  # False for NaN as well.
  pos = jnp.maximum(pos, 0.0)
  low = jnp.floor(pos)
  at_edge = low >= length - 1  # The last row is read alone, not blended.
  frac = jnp.where(at_edge, 0.0, pos - low)
  # Clipped after the cast so that NaN positions (weight 0) still index
  # inside the map.
  low = jnp.clip(low.astype(jnp.int32), 0, length - 1)
  high = jnp.where(at_edge, low, jnp.minimum(low + 1, length - 1))
  w_low = jnp.where(inside, 1.0 - frac, 0.0)
  w_high = jnp.where(inside, frac, 0.0)
  return low, high, w_low, w_high


def _box_edges(boxes, height, width):
  """[R, 4] normalised (x1, y1, x2, y2) -> four [R] edges in map cells."""
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
  x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
  return x1 * width, y1 * height, x2 * width, y2 * height


def _roi_align_image(feature_map, boxes, output_size, sampling_ratio,
                     aligned):
  """One image: [H, W, C], [R, 4] -> [R, P_h, P_w, C]."""
  H, W, C = feature_map.shape
  (P_h, P_w), S = output_size, sampling_ratio
  x1, y1, x2, y2 = _box_edges(boxes, H, W)
  rows = axis_taps(y1, y2, H, P_h, S, aligned)  # 4 x [R, P_h, S]
  cols = axis_taps(x1, x2, W, P_w, S, aligned)  # 4 x [R, P_w, S]
  row_idx = jnp.stack(rows[:2], -1)  # [R, P_h, S, 2]: low, high
  col_idx = jnp.stack(cols[:2], -1)  # [R, P_w, S, 2]
  row_w = jnp.stack(rows[2:], -1)
  col_w = jnp.stack(cols[2:], -1)
  # Every tap of every sample of every bin, in one gather:
  # [R, P_h, P_w, S_y, S_x, 2 (row tap), 2 (column tap)].
  row_idx = row_idx[:, :, None, :, None, :, None]
  col_idx = col_idx[:, None, :, None, :, None, :]
  flat_idx = row_idx * W + col_idx
  weights = (row_w[:, :, None, :, None, :, None]
             * col_w[:, None, :, None, :, None, :])
  # In bounds by construction (axis_taps clips), so no bounds handling.
  taps = feature_map.reshape(H * W, C).at[flat_idx].get(
      mode='promise_in_bounds')  # [R, P_h, P_w, S, S, 2, 2, C]
  summed = jnp.einsum('rpqijkl,rpqijklc->rpqc', weights, taps,
                      preferred_element_type=jnp.float32)
  return (summed / (S * S)).astype(feature_map.dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def roi_align(feature_map, boxes, output_size=(7, 7), sampling_ratio=2,
              aligned=True):
  """RoIAlign: feature_map [B, H, W, C], boxes [B, R, 4] (normalised
  x1, y1, x2, y2) -> [B, R, P_h, P_w, C] in the feature map's dtype.

  output_size: P or a tuple (P_h, P_w); it, sampling_ratio (S) and aligned
  are static under jit. Semantics: the module docstring (torchvision's).
  Gathers R * P_h * P_w * S**2 * 4 taps of C channels per image; for one
  pooled vector per box use roi_pool_mean, which never builds them.
  """
  output_size = _check_args(feature_map, boxes, output_size, sampling_ratio)
  per_image = functools.partial(_roi_align_image, output_size=output_size,
                                sampling_ratio=sampling_ratio,
                                aligned=aligned)
  return jax.vmap(per_image)(feature_map, boxes)


def _axis_profile(lo, hi, length, num_bins, sampling_ratio, aligned):
  """[R] edges -> [R, length] float32: each row's (or column's) total
  weight over the box's samples along this axis, divided by their number."""
  low, high, w_low, w_high = axis_taps(lo, hi, length, num_bins,
                                       sampling_ratio, aligned)
  weight = (jax.nn.one_hot(low, length) * w_low[..., None]
            + jax.nn.one_hot(high, length) * w_high[..., None])
  return weight.mean(axis=(1, 2))


def _roi_pool_mean_image(feature_map, boxes, output_size, sampling_ratio,
                         aligned):
  """One image: [H, W, C], [R, 4] -> [R, C]."""
  H, W, _ = feature_map.shape
  (P_h, P_w), S = output_size, sampling_ratio
  x1, y1, x2, y2 = _box_edges(boxes, H, W)
  rows = _axis_profile(y1, y2, H, P_h, S, aligned)  # [R, H]
  cols = _axis_profile(x1, x2, W, P_w, S, aligned)  # [R, W]
  pooled = jnp.einsum('rh,rw,hwc->rc', rows, cols,
                      feature_map.astype(jnp.float32))
  return pooled.astype(feature_map.dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def roi_pool_mean(feature_map, boxes, output_size=(7, 7), sampling_ratio=2,
                  aligned=True):
  """roi_align(...) averaged over its P_h x P_w bins: feature_map
  [B, H, W, C], boxes [B, R, 4] -> [B, R, C] in the feature map's dtype.

  The mean of all bins is the mean of all P*S x P*S samples, and each
  sample's weight on cell (h, w) is a row weight times a column weight, so
  the result is rows[R, H] . F[H, W, C] . cols[R, W]: two small matmuls
  instead of the [B, R, P, P, C] tensor and its gathers (equal up to
  float32 rounding).
  """
  output_size = _check_args(feature_map, boxes, output_size, sampling_ratio)
  per_image = functools.partial(_roi_pool_mean_image, output_size=output_size,
                                sampling_ratio=sampling_ratio,
                                aligned=aligned)
  return jax.vmap(per_image)(feature_map, boxes)
