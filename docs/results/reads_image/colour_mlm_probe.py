"""Does pre-training ground colour words? MLM on colour words alone, own image vs another's.

  python docs/results/reads_image/colour_mlm_probe.py PRETRAIN_WORKDIR [N] [STEP]

For the first N pairs (default 1024, at most the split) of the pre-training
run's evaluation split, at checkpoint STEP (a number, 'best' or 'latest',
the default):
every colour word of the caption (scenes.COLOURS that are one
WordPiece: 7 of the 8, not 'cyan')
is replaced by [MASK] and predicted by the MLM head, CMAP off, no other
corruption. Accuracy of the argmax over those colour words, with the pair's
own regions and with the next pair's regions (the image shuffled), beside
the most frequent colour (the prior); and the same with every anchor
swapped (CMAP's SWAP on all of them, as AMC's evaluation does), where the
colour word's own noun may hold its region's feature: the colour can then
be read off the next slot, without finding the region. A model that
grounds colour words scores well above the prior with its own image and
falls to it with another's."""
import sys, json
import numpy as np, jax, jax.numpy as jnp
from cmal_jax import objectives
from cmal_jax.predict_anchors import AnchorFinder
from cmal_jax.world import scenes
from cmal_jax.model.cmal import IMAGE_INPUTS


def main(workdir, n=1024, step='latest', batch_size=64):
  finder = AnchorFinder.from_workdir(workdir, step)
  n = min(n, len(finder.source))  # The world's val split holds 512.
  # The colours that are one WordPiece ('cyan' is two: left out).
  colour_ids = np.array([i for i in (finder.tokenizer._tok.token_to_id(c)
                                     for c in scenes.COLOURS) if i is not None])
  mask_id = finder.specials.mask

  def apply(params, batch, positions, shuffle, swap):
    inputs, _ = objectives.prepare_inputs(batch, jax.random.key(0), finder.config,
                                          finder.specials, corrupt=False,
                                          actions='all_swapped' if swap else 'none')
    if shuffle:
      inputs = dict(inputs, **{k: jnp.roll(inputs[k], 1, 0) for k in IMAGE_INPUTS if k in inputs})
    ids = inputs['input_ids']
    hit = jnp.isin(ids, jnp.asarray(colour_ids))
    inputs = dict(inputs, input_ids=jnp.where(hit, mask_id, ids), mlm_positions=positions)
    logits = finder.model.apply({'params': params}, inputs)['mlm_logits']
    return jnp.take(logits, jnp.asarray(colour_ids), axis=-1).argmax(-1)  # [B, M]
  apply = jax.jit(apply, static_argnums=(3, 4))

  conditions = {'own_image': (False, False), 'image_shuffled': (True, False),
                'own_image_anchors_swapped': (False, True),
                'image_shuffled_anchors_swapped': (True, True)}
  counts = dict.fromkeys(conditions, 0)
  targets = []
  for start in range(0, n, batch_size):
    idx = list(range(start, min(start + batch_size, n)))
    batch = finder.encode(idx, [finder.pair(i)['caption'] for i in idx])
    ids = batch['input_ids']
    where = np.isin(ids, colour_ids)
    M = max(int(where.sum(1).max()), 1)
    positions = np.zeros((len(idx), M), np.int32)
    valid = np.zeros((len(idx), M), bool)
    for b in range(len(idx)):
      p = np.flatnonzero(where[b])
      positions[b, :len(p)], valid[b, :len(p)] = p, True
    target = np.searchsorted(np.sort(colour_ids), ids[np.arange(len(idx))[:, None], positions])
    order = np.argsort(colour_ids)
    target = order[target]  # index into colour_ids
    targets.append(target[valid])
    for name, (shuffle, swap) in conditions.items():
      pred = np.asarray(apply(finder.params, batch, positions, shuffle, swap))
      counts[name] += int((pred == target)[valid].sum())
  targets = np.concatenate(targets)
  total = len(targets)
  prior = np.bincount(targets, minlength=len(colour_ids)).max() / total
  out = dict(workdir=workdir, step=step, colour_words=total,
             **{k: v / total for k, v in counts.items()}, prior=float(prior))
  print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == '__main__':
  main(sys.argv[1], *(int(a) for a in sys.argv[2:3]), *sys.argv[3:4])
