"""Evaluation on held-out pairs: AMC pairing, MLM, ITM, and zero-shot
image-text retrieval by ITM score (and by ITC similarity where trained)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmal_jax import controls, objectives, sharding, task_metrics
from cmal_jax.data import pipeline, tfds_source
from cmal_jax.data import anchors as anchors_lib
from cmal_jax.data.shapes import Shapes
from cmal_jax.data.tokenizer import load_tokenizer

EVAL_SEED_OFFSET = 7919  # Eval corruption key differs from any train step's.


def correct_and_count(logits, labels, weights):
  """Number of weighted argmax hits and the weight total (float32)."""
  w = weights.astype(jnp.float32)
  hit = (jnp.argmax(logits, -1) == jnp.maximum(labels, 0)).astype(jnp.float32)
  return jnp.sum(hit * w), jnp.sum(w)


def make_eval_step(model, config, specials):
  """(params, batch) -> {name: (hits, count)} for the pre-training heads.

  Corruption follows the training distribution under a fixed key, so the
  accuracies are those of the training tasks on held-out pairs. AMC is also
  measured with every valid anchor swapped (`*_all_swapped`), a harder,
  deterministic variant, and on that under the place controls
  (`*_place_scrambled`, `*_place_only`); ITM also label-blind
  (`itm_acc_label_blind`, CMAP off). controls.py says what each shows.
  """
  rng = jax.random.key(config.seed + EVAL_SEED_OFFSET)
  control_rng = jax.random.fold_in(rng, 1)
  with_amc = config.cmap.enabled and config.loss.amc > 0

  def pairing_counts(out, t, weights, suffix):
    return {
        f'amc_t2r_acc{suffix}': correct_and_count(out['amc_t2r_logits'],
                                                  t['amc_region'], weights),
        f'amc_r2t_acc{suffix}': correct_and_count(out['amc_r2t_logits'],
                                                  t['amc_text_pos'], weights),
    }

  def amc_counts(out, t, suffix=''):
    w = t['amc_weights']
    return {
        **pairing_counts(out, t, w, suffix),
        f'amc_word_acc{suffix}': correct_and_count(out['amc_word_logits'],
                                                   t['amc_word'], w),
        f'amc_tag_acc{suffix}': correct_and_count(
            out['amc_tag_logits'], t['amc_tag'], t['amc_tag_weights']),
    }

  def itm_counts(out, t, name):
    return {name: correct_and_count(out['itm_logits'], t['itm_label'],
                                    jnp.ones_like(t['itm_label'], bool))}

  def eval_step(params, batch):
    apply = lambda inputs: model.apply({'params': params}, inputs,
                                       deterministic=True)
    inputs, t = objectives.prepare_inputs(batch, rng, config, specials)
    out = apply(inputs)
    counts = {
        'mlm_acc': correct_and_count(out['mlm_logits'], t['mlm_targets'],
                                     t['mlm_weights']),
        **itm_counts(out, t, 'itm_acc'),
    }
    # ITM where the inputs cannot tell the label: CMAP off, uncorrupted.
    blind, t_blind = objectives.prepare_inputs(batch, rng, config, specials,
                                               actions='none', corrupt=False)
    counts.update(itm_counts(apply(blind), t_blind, 'itm_acc_label_blind'))
    if with_amc:
      clean, t_clean = objectives.prepare_inputs(
          batch, rng, config, specials, actions='all_swapped', corrupt=False)
      counts.update(amc_counts(out, t))
      counts.update(amc_counts(apply(clean), t_clean, '_all_swapped'))
      # The place controls, on the all-swapped inputs (controls.py).
      counts.update(pairing_counts(
          apply(controls.place_scrambled(clean, control_rng)), t_clean,
          t_clean['amc_weights'], '_place_scrambled'))
      place_only, weights = controls.place_only(clean, t_clean)
      counts.update(pairing_counts(apply(place_only), t_clean, weights,
                                   '_place_only'))
      # Chance of each: 1 / the anchors moved in the example, over the
      # anchors it scores (a single swapped anchor is found by elimination).
      counts['amc_pair_chance_all_swapped'] = controls.pairing_chance(
          t_clean['amc_weights'], t_clean['amc_weights'])
      counts['amc_pair_chance_place_only'] = controls.pairing_chance(
          t_clean['amc_weights'], weights)
    return counts

  return eval_step


def retrieval_pairs(config, directory, split, num_images):
  """Yields (caption i, image j) rows over the first `num_images` pairs of a
  split, row-major (i * N + j), each encoded like a training pair: anchors
  are detected for the pair actually fed."""
  source, path, meta = tfds_source.open_pairs(config, directory, split)
  vocab = anchors_lib.TagVocab.from_meta(meta)
  shapes = Shapes.from_config(config)
  tokenizer = load_tokenizer(config.data.vocab_path or None)
  n = min(num_images, len(source))
  examples = [pipeline.decode_pair(source[i], path=path, index=i,
                                   shapes=shapes, vocab=vocab)
              for i in range(n)]
  for caption in (e['caption'] for e in examples):
    for image in examples:
      yield pipeline.encode_pair(caption, image, tokenizer, vocab, shapes)[0]


def make_itm_scorer(model, config, specials):
  """(params, batch) -> ITM log p(match) [B], inputs uncorrupted, with the
  CMAP actions ITM trains with (objectives.itm_actions): none for a
  label-blind ITM (every recipe's default), else every anchor swapped."""
  rng = jax.random.key(config.seed + EVAL_SEED_OFFSET)
  actions = objectives.itm_actions(config)

  def score(params, batch):
    inputs, _ = objectives.prepare_inputs(batch, rng, config, specials,
                                          actions=actions, corrupt=False)
    logits = model.apply({'params': params}, inputs,
                         deterministic=True)['itm_logits']
    return jax.nn.log_softmax(logits)[:, 1]

  return score


def _pair_arrays(rows):
  """Encoded pair dicts -> {k: [N, ...]}, itm_label all 1 (not used)."""
  arrays = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  arrays['itm_label'] = np.ones(len(rows), np.int32)
  return arrays


def itm_score_matrix(model, params, config, rows, specials, mesh):
  """ITM scores of every (caption, image) pair: [N, N] from the N * N
  row-major rows of retrieval_pairs, in jitted batches."""
  scorer = jax.jit(make_itm_scorer(model, config, specials),
                   out_shardings=sharding.replicated(mesh))
  n = int(round(len(rows) ** 0.5))
  scores = [np.asarray(scorer(params, batch))[:real] for batch, real in
            sharding.padded_global_batches(_pair_arrays(rows),
                                           config.eval.batch_size, mesh)]
  return np.concatenate(scores).reshape(n, n)


def matched_pair_outputs(fn, params, config, rows, mesh):
  """fn(params, batch), jitted, over only the N matched pairs (i, i) of
  retrieval_pairs' N * N rows, in padded global batches: its outputs as
  host arrays [N, ...], padding dropped."""
  n = int(round(len(rows) ** 0.5))
  jitted = jax.jit(fn, out_shardings=sharding.replicated(mesh))
  outs = [jax.tree.map(lambda x, real=real: x[:real],
                       jax.device_get(jitted(params, batch)))
          for batch, real in sharding.padded_global_batches(
              _pair_arrays(rows[::n + 1]), config.eval.batch_size, mesh)]
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def itc_score_matrix(model, params, config, rows, mesh):
  """ITC similarities [N, N] (caption i, image j) from UMSE embeddings; only
  the N matched rows (i, i) are encoded, each once."""
  text, image = matched_pair_outputs(
      lambda p, b: model.apply({'params': p}, b, method='itc_embeddings'),
      params, config, rows, mesh)
  return text @ image.T


def umse_spread(model, params, config, rows, mesh):
  """Whether the UMSE features still tell inputs apart (a collapse check),
  over the N matched pairs of retrieval_pairs' rows: sqrt(D) times the
  per-dimension std of the unit-normalised features, averaged over the D
  dimensions, across every real region ('umse_region_spread') and every
  real caption token after [CLS] ('umse_text_spread'). 1 for directions
  spread evenly over the sphere; 0 when every region (token) maps to one
  vector, which MLM + ITM pre-training can reach when ITM never leaves
  chance (docs/results.md, "SemVLP and SemMIM at small")."""
  (text, regions), (text_mask, region_mask) = matched_pair_outputs(
      lambda p, b: (model.apply({'params': p}, b, method='embed_units'),
                    (b['text_mask'][:, 1:], b['region_mask'])),
      params, config, rows, mesh)

  def spread(x):
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return float(np.sqrt(x.shape[-1]) * x.std(0).mean())

  return {'umse_text_spread': spread(text[text_mask > 0]),
          'umse_region_spread': spread(regions[region_mask > 0])}


def recall_at_k(scores, ks=(1, 5, 10)):
  """scores [N, N], row i = caption i, column j = image j; pair i <-> i.

  Returns {t2i_r{k}, i2t_r{k}} (recall@k) in [0, 1]; ties count against the
  query (task_metrics.gold_ranks).
  """
  gold = np.arange(scores.shape[0])
  out = {}
  for name, s in (('t2i', scores), ('i2t', scores.T)):
    out.update({f'{name}_{k}': v for k, v in
                task_metrics.recall_at_k(s, gold, ks).items()})
  return out


def evaluate_pretrain(model, params, config, directory, specials, mesh,
                      axis_rules, retrieval=True):
  """Held-out evaluation of a pre-trained model; returns a flat dict.

  retrieval=False skips zero-shot retrieval (it scores N^2 pairs), for cheap
  periodic evaluations.
  """
  local_batch = sharding.per_process_batch_size(config.eval.batch_size, mesh)
  ds, _, dropped = pipeline.make_dataset(
      config, directory, config.data.eval_split, batch_size=local_batch,
      train=False, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    step = jax.jit(make_eval_step(model, config, specials))
    totals, num_pairs = {}, 0
    for local in ds:
      num_pairs += int(local.pop('stats')['examples'].sum())
      counts = jax.device_get(step(params, sharding.global_batch(local,
                                                                 mesh)))
      for k, (hits, n) in counts.items():
        h0, n0 = totals.get(k, (0.0, 0.0))
        totals[k] = (h0 + float(hits), n0 + float(n))
    # A metric nothing was scored for reads 0 (e.g. the AMC tag with every
    # anchor swapped under loss.amc_tag_at='unswapped'; a grid without
    # anchors), so every run reports the same keys.
    results = {k: h / max(n, 1.0) for k, (h, n) in totals.items()}
    for suffix in ('', '_all_swapped', '_place_scrambled', '_place_only'):
      if f'amc_t2r_acc{suffix}' in results:
        results[f'amc_pair_acc{suffix}'] = (results[f'amc_t2r_acc{suffix}'] +
                                            results[f'amc_r2t_acc{suffix}']) / 2
        results[f'amc_anchors{suffix}'] = totals[f'amc_t2r_acc{suffix}'][1]
    results['num_pairs'] = num_pairs * jax.process_count()
    results['num_pairs_not_evaluated'] = dropped  # Last partial batch.

    if not retrieval:
      return results
    rows = list(retrieval_pairs(config, directory, config.data.eval_split,
                                config.eval.retrieval_images))
    scores = itm_score_matrix(model, params, config, rows, specials, mesh)
    results.update({f'retrieval_{k}': v
                    for k, v in recall_at_k(scores).items()})
    # ITM on hard negatives whose anchor count is the positive's.
    anchor_counts = np.array([r['anchor_valid'].sum() for r in rows]).reshape(
        scores.shape)
    results.update(controls.same_anchor_itm(scores, anchor_counts,
                                            config.seed + EVAL_SEED_OFFSET))
    results.update(umse_spread(model, params, config, rows, mesh))
    if config.loss.itc > 0:  # Where ITC was trained, retrieval by it too.
      itc = itc_score_matrix(model, params, config, rows, mesh)
      results.update({f'retrieval_itc_{k}': v
                      for k, v in recall_at_k(itc).items()})
  results['retrieval_images'] = scores.shape[0]
  return results
