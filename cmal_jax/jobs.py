"""The job a run is, by config.task: pre-training (pretraining.py) or a
downstream task (finetune.py). The entry point (main.py) picks it here and
hands it to the loop (train.py), which knows neither."""

from cmal_jax import finetune, pretraining, train


def make_job_for(task):
  """The make_job(config, workdir, mesh, axis_rules, local_batch) ->
  train_step.Job of `task`: 'pretrain' or a task of data.tasks.TASKS
  (configlib.validate refuses any other)."""
  return pretraining.make_job if task == 'pretrain' else finetune.make_job


def train_and_evaluate(config, workdir):
  """What `python -m cmal_jax.main` runs: config.task's job through the
  loop (train.run). Returns the final evaluation dict (also in
  workdir/eval.json), or None when config.stop_at_step ended the run."""
  return train.run(config, workdir, make_job_for(config.task))
