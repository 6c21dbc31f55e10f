"""The pre-training job: the world's (or your) pairs, the CMAL model, the
recipe's objectives (cmal_jax/recipes/) and the held-out evaluation, as a
train_step.Job for the loop in train.py."""

import jax

from cmal_jax import evaluate, objectives, recipes, sharding, storage
from cmal_jax.data import pipeline, shards, tfds_source
from cmal_jax.data.shapes import Shapes, zero_inputs
from cmal_jax.data.tokenizer import load_tokenizer
from cmal_jax.logs import log
from cmal_jax.model.cmal import CMAL, ModelConfig
from cmal_jax.train_step import Job
from cmal_jax.world import synthetic


def pretrain_objectives(model, config, specials):
  """(init_inputs(rng), Loss) of the config's recipe (cmal_jax/recipes/):
  its corruption, losses and hooks, and the model inputs for init."""
  recipe = recipes.get(config.recipe)
  loss = recipe.make_loss(model, config, specials)

  def init_inputs(rng):
    batch = zero_inputs(Shapes.from_config(config), 1, pretrain=True)
    inputs = objectives.prepare_inputs(batch, rng, config, specials)[0]
    return recipe.init_inputs(inputs, config)

  return init_inputs, loss


def make_job(config, workdir, mesh, axis_rules, local_batch):
  """The Job of a pre-training config: CMAP, AMC, MLM, ITM, MRC, ITC."""
  directory = synthetic.data_dir(config, workdir)
  # data.source='tfds:...' reads a TFDS dataset (tfds_source.py), not
  # `directory`'s records: no synthetic world then.
  tfds_spec = tfds_source.source_spec(config)
  if not config.data.dir and tfds_spec is None:
    synthetic.ensure_world_data(config, directory,
                      every_process=storage.is_remote(workdir))
  tokenizer = load_tokenizer(config.data.vocab_path or None)
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ValueError(
        f'config.model.vocab_size={config.model.vocab_size} does not match '
        f'the vocabulary {tokenizer.vocab_path} ({tokenizer.vocab_size}).')
  specials = objectives.SpecialTokens.from_tokenizer(tokenizer)
  eval_local = sharding.per_process_batch_size(config.eval.batch_size, mesh)
  for field, rows in (('batch_size', local_batch),
                      ('eval.batch_size', eval_local)):
    if rows % config.data.itm_group:
      raise ValueError(
          f'config.data.itm_group={config.data.itm_group} must divide the '
          f'per-process batch of config.{field} ({rows} rows over '
          f'{jax.process_count()} process(es)): ITM negatives are drawn '
          'within groups of that many rows.')
  train_ds, vocab, _ = pipeline.make_dataset(
      config, directory, config.data.train_split, batch_size=local_batch,
      train=True, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  eval_source, eval_path, _ = tfds_source.open_pairs(
      config, directory, config.data.eval_split)
  num_eval = len(eval_source)
  if num_eval < config.eval.batch_size:  # Else evaluation would see nothing.
    raise ValueError(
        f'{eval_path} holds {num_eval} pairs, fewer than '
        f'config.eval.batch_size={config.eval.batch_size}: lower '
        'eval.batch_size or add pairs.')
  model = CMAL(ModelConfig.from_config(config.model,
                                       config.model.num_tags or vocab.num_tags))
  init_inputs, loss = pretrain_objectives(model, config, specials)

  def evaluate_now(params, final):
    return evaluate.evaluate_pretrain(
        model, params, config, directory, specials, mesh, axis_rules,
        retrieval=final or config.eval.best_metric.startswith('retrieval'))

  data_name = config.data.source if tfds_spec else directory
  log(f'Data {data_name} ({vocab.num_tags} tags).')
  # The epoch of the whole run: under own_shards no process holds the
  # split, meta.json counts its shards' pairs.
  epoch_size = (shards.num_pairs(directory, config.data.train_split)
                if shards.reads_own_shards(config) else len(
                    tfds_source.open_pairs(config, directory,
                                           config.data.train_split)[0]))
  return Job(model=model, train_ds=train_ds, epoch_size=epoch_size,
             stat_keys=pipeline.stat_keys(config), init_inputs=init_inputs,
             loss=loss, evaluate=evaluate_now, directory=data_name)
