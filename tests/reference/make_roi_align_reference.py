"""Writes roi_align_torchvision.npz: torchvision's RoIAlign on fixed inputs,
the reference for test_roi_align.py's comparison with torchvision.

The test environment cannot import torchvision (the pinned torch 2.13.0 is
a local CPU build; PyPI's torchvision fails beside it with "operator
torchvision::nms does not exist"), so the outputs are computed once, in a
throwaway venv outside the repository, and committed. Made with

  python -m venv /tmp/tvenv
  /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy
  /tmp/tvenv/bin/python tests/reference/make_roi_align_reference.py

(run from the repository root; torch 2.14.1+cu130, torchvision 0.29.1+cu130,
a CUDA build run on the CPU, i.e. torchvision's C++ CPU kernel; numpy 2.4.6.
The versions are also stored in the file, under 'versions'.)

This script imports neither jax nor cmal_jax. It asks torchvision exactly
the question cmal_jax.model.roi_align.roi_align(fm, boxes, output_size,
sampling_ratio, aligned) answers: fm [B, H, W, C] -> NCHW; boxes [B, R, 4]
normalised (x1, y1, x2, y2) -> [B * R, 5] rows (image index, x1 * W,
y1 * H, x2 * W, y2 * H), the products taken in float32 as roi_align takes
them; spatial_scale=1.0; the output [B * R, C, P_h, P_w] -> [B, R, P_h, P_w,
C].

Boxes: EDGE_BOXES (a copy of test_roi_align.EDGE_BOXES; the test checks the
two agree) on every image, then random ones: well-formed boxes inside the
image and arbitrary corners in [-0.3, 1.3]^2 (often reversed, often partly
outside). Every box is compared, reversed and zero-size ones included, for
aligned=False (torchvision, like roi_align, widens them to one cell) and
aligned=True (neither widens them). Left out: NaN boxes. roi_align gives
zeros for them; torchvision 0.29.1's CPU kernel casts the NaN sample
position to int and reads out of bounds (it crashed with a segmentation
fault when tried), so there is nothing to compare against.

File layout (all arrays; no pickles):
  versions            str [3]: 'torch=...', 'torchvision=...', 'numpy=...'
  fm{m}, boxes{m}     float32 [B, H, W, C] and [B, R, 4], map m = 0, 1, ...
  case_names          str [N], e.g. 'map1_12x12_out3x5_sr2_aligned'
  case_params         int64 [N, 5]: map index, P_h, P_w, sampling_ratio,
                      aligned (0/1)
  out{k}              float32 [B, R, P_h, P_w, C], torchvision's output for
                      case k
"""

import itertools
import os

import numpy as np
import torch
import torchvision
from torchvision.extension import _has_ops
from torchvision.ops import roi_align

SEED = 20240611
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                   'roi_align_torchvision.npz')

# Feature maps [B, H, W, C]: square, larger, and odd non-square both ways.
# Cases: see combinations().
MAP_SHAPES = [(2, 7, 7, 3), (2, 12, 12, 3), (2, 5, 9, 3), (2, 10, 7, 3)]
OUTPUT_SIZES = [(2, 2), (4, 4), (3, 5)]
SAMPLING_RATIOS = [1, 2, 3]
ALIGNED = [True, False]
NUM_INSIDE, NUM_ANYWHERE = 3, 3  # random boxes per image, of each kind

# Copy of tests/test_roi_align.py's EDGE_BOXES (the test checks they agree).
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


def make_boxes(rng, batch):
  """[B, R, 4] float32: EDGE_BOXES, then random boxes, on every image."""
  corners = rng.uniform(0, 1, (batch, NUM_INSIDE, 2, 2))
  inside = np.concatenate([corners.min(axis=2), corners.max(axis=2)], -1)
  anywhere = rng.uniform(-0.3, 1.3, (batch, NUM_ANYWHERE, 4))
  edge = np.broadcast_to(EDGE_BOXES, (batch,) + EDGE_BOXES.shape)
  return np.concatenate([edge, inside, anywhere], 1).astype(np.float32)


def combinations(m):
  """(output_size, sampling_ratio, aligned) for map m: every combination on
  map 0; on the others every (output_size, aligned) pair once, with the
  sampling ratio rotating so that each map still sees every ratio in both
  modes (each case is one more XLA compilation in the test)."""
  if m == 0:
    return list(itertools.product(OUTPUT_SIZES, SAMPLING_RATIOS, ALIGNED))
  return [(size, SAMPLING_RATIOS[(m + o + int(aligned))
                                 % len(SAMPLING_RATIOS)], aligned)
          for o, size in enumerate(OUTPUT_SIZES) for aligned in ALIGNED]


def torchvision_roi_align(fm, boxes, output_size, sampling_ratio, aligned):
  """roi_align's question, put to torchvision: [B, H, W, C], normalised
  [B, R, 4] -> [B, R, P_h, P_w, C] float32."""
  B, H, W, C = fm.shape
  R = boxes.shape[1]
  # Feature-map cells, multiplied in float32 as roi_align's _box_edges does.
  cells = boxes * np.array([W, H, W, H], np.float32)
  assert cells.dtype == np.float32
  index = np.repeat(np.arange(B, dtype=np.float32), R)[:, None]
  rois = np.concatenate([index, cells.reshape(B * R, 4)], 1)
  out = roi_align(torch.from_numpy(fm.transpose(0, 3, 1, 2).copy()),
                  torch.from_numpy(rois), output_size, spatial_scale=1.0,
                  sampling_ratio=sampling_ratio, aligned=aligned)
  out = out.numpy().reshape(B, R, C, *output_size).transpose(0, 1, 3, 4, 2)
  return np.ascontiguousarray(out, np.float32)


def main():
  # The compiled C++ kernel, not torchvision's pure-Python fallback.
  assert _has_ops(), 'torchvision has no compiled ops'
  rng = np.random.default_rng(SEED)
  arrays = {'versions': np.array([f'torch={torch.__version__}',
                                  f'torchvision={torchvision.__version__}',
                                  f'numpy={np.__version__}'])}
  names, params = [], []
  for m, shape in enumerate(MAP_SHAPES):
    fm = rng.normal(size=shape).astype(np.float32)
    boxes = make_boxes(rng, shape[0])
    arrays[f'fm{m}'], arrays[f'boxes{m}'] = fm, boxes
    for (p_h, p_w), s, aligned in combinations(m):
      k = len(names)
      names.append(f'map{m}_{shape[1]}x{shape[2]}_out{p_h}x{p_w}_sr{s}_'
                   + ('aligned' if aligned else 'unaligned'))
      params.append((m, p_h, p_w, s, int(aligned)))
      arrays[f'out{k}'] = torchvision_roi_align(fm, boxes, (p_h, p_w), s,
                                                aligned)
  arrays['case_names'] = np.array(names)
  arrays['case_params'] = np.array(params, np.int64)
  np.savez_compressed(OUT, **arrays)
  print(f'{OUT}: {len(names)} cases, {os.path.getsize(OUT)} bytes, '
        f'{", ".join(arrays["versions"])}')


if __name__ == '__main__':
  main()
