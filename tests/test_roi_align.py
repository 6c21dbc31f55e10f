"""RoIAlign against torchvision and against a loop-by-loop numpy
transcription of torchvision's CPU kernel.

Against torchvision: torchvision cannot be imported beside the pinned torch
2.13.0 CPU build (PyPI's torchvision fails with "operator torchvision::nms
does not exist"), so its outputs were computed once, in a throwaway venv
with torch 2.14.1 and torchvision 0.29.1 (the C++ CPU kernel), by
tests/reference/make_roi_align_reference.py (its docstring has the exact
commands) and committed as tests/reference/roi_align_torchvision.npz:
4 feature maps [2, H, W, 3] (7x7, 12x12, 5x9, 10x7), on each image
EDGE_BOXES (reversed and zero-size ones included) plus 6 random boxes; on
the 7x7 map every output size in (2, 2), (4, 4), (3, 5), sampling ratio in
1, 2, 3 and aligned in True, False, on the others each (output size,
aligned) pair once with the ratio rotating: 36 cases.
test_matches_torchvision checks roi_align equals torchvision's output, and
roi_pool_mean its mean over the bins, to 1e-5 in every case (the largest
difference seen was 3.2e-6, 1.2e-7 with jit off: compiled, XLA:CPU fuses
multiply-adds such as a box's x * W - 0.5 into FMAs, which moves sample
positions by an ulp or two). NaN boxes are not among
them: torchvision 0.29.1 reads out of bounds on them (it crashed) where
roi_align gives zeros.

The numpy transcription (roi_align_reference below) runs on any input, so
the other tests use it for what the stored cases do not cover (other
shapes, jit, vmap, bfloat16, gradients)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmal_jax.model.roi_align import roi_align, roi_pool_mean

ATOL = 1e-5


# ---------------------------------------------------------------------------
# Reference: torchvision/csrc/ops/cpu/roi_align_kernel.cpp, written for
# clarity (float64, one box, one bin, one sample at a time).


def bilinear_reference(fm, y, x):
  """torchvision's bilinear_interpolate: fm [H, W, C] at (y, x) -> [C]."""
  H, W, C = fm.shape
  if not (-1.0 <= y <= H and -1.0 <= x <= W):  # NaN fails this too.
    return np.zeros(C)
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= H - 1:
    y_high = y_low = H - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= W - 1:
    x_high = x_low = W - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return (hy * hx * fm[y_low, x_low] + hy * lx * fm[y_low, x_high]
          + ly * hx * fm[y_high, x_low] + ly * lx * fm[y_high, x_high])


def roi_align_reference(fm, boxes, output_size, sampling_ratio, aligned):
  """fm [B, H, W, C], normalised boxes [B, R, 4] -> [B, R, P_h, P_w, C].

  Sample positions are computed in float32, as the kernel computes them
  for float32 inputs (T = float): a sample that lands exactly on -1 or H
  in float32 is kept (it reads the border) where float64 can put it just
  outside (0). EDGE_BOXES[8] does so on some maps (e.g. 5x9, output 3x5,
  sampling_ratio 2, aligned=False: x = -1.0 in float32, -1.00000005 in
  float64), and test_numpy_transcription_matches_torchvision caught it.
  The interpolation and the sums are float64."""
  f32 = np.float32
  fm = np.asarray(fm, np.float64)
  B, H, W, C = fm.shape
  P_h, P_w = output_size
  R = boxes.shape[1]
  out = np.zeros((B, R, P_h, P_w, C))
  offset = f32(0.5 if aligned else 0.0)
  for b in range(B):
    for r in range(R):
      x1, y1, x2, y2 = (np.asarray(boxes[b, r], f32)
                        * np.array([W, H, W, H], f32))
      start_w, start_h = x1 - offset, y1 - offset
      roi_w, roi_h = (x2 - offset) - start_w, (y2 - offset) - start_h
      if not aligned:
        roi_w, roi_h = max(roi_w, f32(1.0)), max(roi_h, f32(1.0))
      bin_h, bin_w = roi_h / f32(P_h), roi_w / f32(P_w)
      grid_h = grid_w = sampling_ratio
      count = max(grid_h * grid_w, 1)
      for ph in range(P_h):
        for pw in range(P_w):
          total = np.zeros(C)
          for iy in range(grid_h):
            y = (start_h + f32(ph) * bin_h
                 + f32(iy + 0.5) * bin_h / f32(grid_h))
            for ix in range(grid_w):
              x = (start_w + f32(pw) * bin_w
                   + f32(ix + 0.5) * bin_w / f32(grid_w))
              total += bilinear_reference(fm[b], float(y), float(x))
          out[b, r, ph, pw] = total / count
  return out


# ---------------------------------------------------------------------------
# Boxes.


def random_boxes(rng, batch, num):
  """[B, R, 4] well-formed boxes inside [0, 1]^2."""
  corners = rng.uniform(0, 1, (batch, num, 2, 2))
  lo, hi = corners.min(axis=2), corners.max(axis=2)
  return np.concatenate([lo, hi], -1).astype(np.float32)  # x1 y1 x2 y2


EDGE_BOXES = np.array([
    [0.0, 0.0, 1.0, 1.0],      # the whole image
    [0.0, 0.5, 0.3, 1.0],      # on the left and bottom borders
    [0.7, 0.0, 1.0, 0.25],     # on the right and top borders
    [-0.2, -0.1, 0.5, 0.4],    # partly outside, top left
    [0.8, 0.7, 1.3, 1.2],      # partly outside, bottom right
    [-0.3, 0.2, 1.4, 0.6],     # wider than the image
    [1.5, 1.5, 2.0, 2.0],      # entirely outside: zeros
    [-0.9, -0.9, -0.5, -0.5],  # entirely outside, negative side
    [-0.15, 0.9, -0.05, 1.1],  # within one cell outside: clamped, not 0
    [0.41, 0.33, 0.43, 0.36],  # smaller than one cell
    [0.12, 0.5, 0.125, 0.51],  # much smaller than one cell
    [0.5, 0.5, 0.5, 0.5],      # zero size: a point
    [0.3, 0.2, 0.3, 0.8],      # zero width
    [0.2, 0.6, 0.9, 0.6],      # zero height
    [0.0, 0.0, 0.0, 0.0],      # zero size at the corner
    [1.0, 1.0, 1.0, 1.0],      # zero size at the far corner
    [0.7, 0.6, 0.2, 0.1],      # reversed
], np.float32)


def edge_boxes(batch):
  return np.broadcast_to(EDGE_BOXES, (batch,) + EDGE_BOXES.shape).copy()


def random_map(rng, shape):
  return rng.normal(size=shape).astype(np.float32)


def check_both(fm, boxes, output_size, sampling_ratio, aligned):
  """roi_align and roi_pool_mean against the reference."""
  expected = roi_align_reference(fm, boxes, output_size, sampling_ratio,
                                 aligned)
  got = roi_align(jnp.asarray(fm), jnp.asarray(boxes), output_size,
                  sampling_ratio, aligned)
  assert got.shape == expected.shape
  np.testing.assert_allclose(np.asarray(got), expected, atol=ATOL, rtol=0)
  pooled = roi_pool_mean(jnp.asarray(fm), jnp.asarray(boxes), output_size,
                         sampling_ratio, aligned)
  np.testing.assert_allclose(np.asarray(pooled), expected.mean(axis=(2, 3)),
                             atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------
# torchvision's outputs, stored by tests/reference/make_roi_align_reference.py
# (see the module docstring). Loaded at import, so a missing or unreadable
# file fails collection rather than skipping anything.

TORCHVISION_NPZ = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'reference', 'roi_align_torchvision.npz')

with np.load(TORCHVISION_NPZ) as _data:  # allow_pickle=False: arrays only
  TORCHVISION = {key: _data[key] for key in _data.files}
TORCHVISION_CASES = [str(name) for name in TORCHVISION['case_names']]


def torchvision_case(k):
  """Case k: (feature map, boxes, output_size, sampling_ratio, aligned,
  torchvision's [B, R, P_h, P_w, C] output)."""
  m, p_h, p_w, sampling_ratio, aligned = (
      int(v) for v in TORCHVISION['case_params'][k])
  return (TORCHVISION[f'fm{m}'], TORCHVISION[f'boxes{m}'], (p_h, p_w),
          sampling_ratio, bool(aligned), TORCHVISION[f'out{k}'])


# ---------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize('k', range(len(TORCHVISION_CASES)),
                         ids=TORCHVISION_CASES)
def test_matches_torchvision(k):
  """roi_align equals torchvision.ops.roi_align, and roi_pool_mean the mean
  of its bins, to ATOL."""
  fm, boxes, output_size, sampling_ratio, aligned, expected = (
      torchvision_case(k))
  name = TORCHVISION_CASES[k]
  got = roi_align(jnp.asarray(fm), jnp.asarray(boxes), output_size,
                  sampling_ratio, aligned)
  np.testing.assert_allclose(np.asarray(got), expected, atol=ATOL, rtol=0,
                             err_msg=f'roi_align vs torchvision, {name}')
  pooled = roi_pool_mean(jnp.asarray(fm), jnp.asarray(boxes), output_size,
                         sampling_ratio, aligned)
  np.testing.assert_allclose(
      np.asarray(pooled), expected.astype(np.float64).mean(axis=(2, 3)),
      atol=ATOL, rtol=0, err_msg=f'roi_pool_mean vs torchvision bin mean, '
      f'{name}')


@pytest.mark.parametrize('k', range(len(TORCHVISION_CASES)),
                         ids=TORCHVISION_CASES)
def test_numpy_transcription_matches_torchvision(k):
  """The loop-by-loop reference the other tests use is torchvision's."""
  fm, boxes, output_size, sampling_ratio, aligned, expected = (
      torchvision_case(k))
  np.testing.assert_allclose(
      roi_align_reference(fm, boxes, output_size, sampling_ratio, aligned),
      expected, atol=ATOL, rtol=0,
      err_msg=f'roi_align_reference vs torchvision, {TORCHVISION_CASES[k]}')


def test_torchvision_reference_covers_the_edge_cases():
  """The stored cases are the ones the module docstring describes: made by
  torchvision 0.29.1, every map's images start with EDGE_BOXES (the
  generator's copy has not drifted from this file's), and both aligned
  modes, several sampling ratios and a non-square output are there."""
  assert any(v.startswith('torchvision=0.29.1')
             for v in TORCHVISION['versions'].tolist())
  params = TORCHVISION['case_params']
  assert len(TORCHVISION_CASES) == len(params) == 36
  for m in np.unique(params[:, 0]):
    boxes = TORCHVISION[f'boxes{m}']
    assert boxes.dtype == TORCHVISION[f'fm{m}'].dtype == np.float32
    np.testing.assert_array_equal(
        boxes[:, :len(EDGE_BOXES)], edge_boxes(boxes.shape[0]))
  assert set(params[:, 4]) == {0, 1}
  assert set(params[:, 3]) == {1, 2, 3}
  assert any(p_h != p_w for p_h, p_w in params[:, 1:3])


@pytest.mark.parametrize('aligned', [True, False])
@pytest.mark.parametrize('output_size,sampling_ratio', [((3, 3), 2),
                                                        ((2, 4), 3),
                                                        ((1, 1), 1)])
def test_random_boxes_match_reference(aligned, output_size, sampling_ratio):
  rng = np.random.default_rng(0)
  fm = random_map(rng, (2, 7, 9, 3))
  check_both(fm, random_boxes(rng, 2, 6), output_size, sampling_ratio,
             aligned)


@pytest.mark.parametrize('aligned', [True, False])
def test_border_outside_small_and_degenerate_boxes(aligned):
  rng = np.random.default_rng(1)
  fm = random_map(rng, (2, 6, 5, 4))
  check_both(fm, edge_boxes(2), (2, 2), 2, aligned)


def test_far_outside_is_zero_and_one_cell_outside_is_clamped():
  fm = np.ones((1, 4, 4, 2), np.float32)
  # Box 0's samples lie beyond one cell outside: 0. Box 1's lie at
  # -1 < x < 0 (x in cells, after the -0.5 shift): clamped, they read column 0.
  boxes = np.array([[[2.0, 2.0, 2.5, 2.5], [-0.1, 0.4, 0.0, 0.6]]],
                   np.float32)
  out = np.asarray(roi_align(fm, boxes, (2, 2), 2, True))
  np.testing.assert_array_equal(out[0, 0], 0.0)
  np.testing.assert_allclose(out[0, 1], 1.0, atol=ATOL)


def test_uniform_map_gives_its_value_inside():
  """Partition of unity: inside the map every bin of a constant map is the
  constant, which checks the four weights sum to one."""
  fm = np.full((1, 5, 5, 3), 2.5, np.float32)
  boxes = random_boxes(np.random.default_rng(2), 1, 8)
  out = roi_align(fm, boxes, (4, 4), 2, True)
  np.testing.assert_allclose(np.asarray(out), 2.5, atol=ATOL)


def test_linear_map_is_reproduced_exactly():
  """Bilinear interpolation of f(h, w) = h + 2w away from the clamped
  border gives f at each sample's position: the bin means are the values
  at the bin centres."""
  H, W = 8, 8
  h, w = np.meshgrid(np.arange(H), np.arange(W), indexing='ij')
  fm = (h + 2.0 * w)[None, :, :, None].astype(np.float32)
  x1, y1, x2, y2 = 0.25, 0.25, 0.75, 0.625
  boxes = np.array([[[x1, y1, x2, y2]]], np.float32)
  out = np.asarray(roi_align(fm, boxes, (2, 2), 2, True))[0, 0, ..., 0]
  ys = y1 * H - 0.5 + (np.arange(2) + 0.5) * (y2 - y1) * H / 2
  xs = x1 * W - 0.5 + (np.arange(2) + 0.5) * (x2 - x1) * W / 2
  np.testing.assert_allclose(out, ys[:, None] + 2 * xs[None, :], atol=ATOL)


def test_nan_box_gives_zeros():
  fm = random_map(np.random.default_rng(3), (1, 4, 4, 2))
  boxes = np.array([[[np.nan, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5]]],
                   np.float32)
  out = np.asarray(roi_align(fm, boxes, (2, 2), 2, True))
  np.testing.assert_array_equal(out[0, 0], 0.0)
  assert np.isfinite(out).all()
  assert np.isfinite(np.asarray(roi_pool_mean(fm, boxes, 2, 2))).all()


def test_jit_batch_of_images():
  rng = np.random.default_rng(4)
  fm = random_map(rng, (4, 8, 6, 5))
  boxes = np.concatenate([random_boxes(rng, 4, 5), edge_boxes(4)[:, :6]], 1)
  align = jax.jit(roi_align, static_argnums=(2, 3, 4))
  pool = jax.jit(roi_pool_mean, static_argnums=(2, 3, 4))
  expected = roi_align_reference(fm, boxes, (3, 3), 2, True)
  np.testing.assert_allclose(np.asarray(align(fm, boxes, (3, 3), 2, True)),
                             expected, atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(pool(fm, boxes, (3, 3), 2, True)),
                             expected.mean(axis=(2, 3)), atol=ATOL, rtol=0)
  # Each image reads its own map: image 1's result does not depend on 0's.
  solo = roi_align(fm[1:2], boxes[1:2], (3, 3), 2, True)
  np.testing.assert_allclose(np.asarray(solo[0]), expected[1], atol=ATOL)


def test_vmap_over_an_outer_axis():
  rng = np.random.default_rng(5)
  fm = random_map(rng, (3, 2, 5, 5, 2))  # [N, B, H, W, C]
  boxes = np.stack([random_boxes(rng, 2, 4) for _ in range(3)])
  out = jax.vmap(lambda f, b: roi_align(f, b, (2, 2)))(fm, boxes)
  for n in range(3):
    np.testing.assert_allclose(
        np.asarray(out[n]), roi_align_reference(fm[n], boxes[n], (2, 2), 2,
                                                True), atol=ATOL)


def test_bfloat16_feature_map():
  """bfloat16 maps: float32 weights and sums, the output rounded once."""
  rng = np.random.default_rng(6)
  fm = jnp.asarray(random_map(rng, (2, 6, 6, 4)), jnp.bfloat16)
  boxes = np.concatenate([random_boxes(rng, 2, 4), edge_boxes(2)], 1)
  expected = roi_align_reference(np.asarray(fm.astype(jnp.float32)), boxes,
                                 (2, 2), 2, True)
  out = roi_align(fm, boxes, (2, 2), 2, True)
  pooled = roi_pool_mean(fm, boxes, (2, 2), 2, True)
  assert out.dtype == pooled.dtype == jnp.bfloat16
  # One bfloat16 rounding of the result: relative error <= 2**-8.
  tol = dict(atol=1e-6, rtol=2.0**-8)
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, **tol)
  np.testing.assert_allclose(np.asarray(pooled, np.float32),
                             expected.mean(axis=(2, 3)), **tol)


def test_gradients_reach_the_map_not_the_boxes():
  rng = np.random.default_rng(7)
  fm = jnp.asarray(random_map(rng, (2, 5, 5, 3)))
  boxes = jnp.asarray(random_boxes(rng, 2, 3))
  loss = lambda f, b: jnp.sum(roi_align(f, b, (2, 2)) ** 2)
  g_fm, g_boxes = jax.jit(jax.grad(loss, argnums=(0, 1)))(fm, boxes)
  assert np.isfinite(np.asarray(g_fm)).all() and np.abs(g_fm).sum() > 0
  np.testing.assert_array_equal(np.asarray(g_boxes), 0.0)
  # roi_pool_mean's gradient is roi_align's with the cotangent spread evenly
  # over the bins (it is roi_align's bin mean, computed another way).
  G = jnp.asarray(rng.normal(size=(2, 3, 3)), jnp.float32)  # [B, R, C]
  via_align = jax.jit(jax.grad(lambda f: jnp.sum(
      roi_align(f, boxes, (2, 2)) * G[:, :, None, None, :]) / 4))(fm)
  via_pool = jax.jit(jax.grad(
      lambda f: jnp.sum(roi_pool_mean(f, boxes, (2, 2)) * G)))(fm)
  np.testing.assert_allclose(np.asarray(via_pool), np.asarray(via_align),
                             atol=ATOL)


def test_rejects_adaptive_sampling_and_bad_shapes():
  fm = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match='sampling_ratio'):
    roi_align(fm, jnp.zeros((1, 2, 4)), (2, 2), 0)
  with pytest.raises(ValueError, match='boxes'):
    roi_align(fm, jnp.zeros((2, 2, 4)), (2, 2), 2)
  with pytest.raises(ValueError, match='feature_map'):
    roi_pool_mean(jnp.zeros((4, 4, 2)), jnp.zeros((1, 2, 4)), (2, 2), 2)

