"""launch/colab.ipynb runs top to bottom: executed with nbclient on the `tiny`
size with 20 pre-training and 20 fine-tuning steps (a cell injected after
the parameters cell overrides them), in a kernel started in launch/ (as
Jupyter does when the notebook is opened there), so the notebook has to find
the repo's configs/ itself. The runs must leave real results: eval.json with
the expected keys, REC predictions, curve images, drawn test examples and
the picture of one test example drawn by python -m cmal_jax.predict --draw.
"""

import json
import os

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'launch', 'colab.ipynb')
STEPS = 20


def tagged(nb, tag):
  cells = [c for c in nb.cells if tag in c.metadata.get('tags', ())]
  assert len(cells) == 1, f'expected one cell tagged {tag!r}'
  return cells[0]


def images(cell):
  return [o for o in cell.outputs if 'image/png' in o.get('data', {})]


def test_notebook_is_saved_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None
  params = tagged(nb, 'parameters')
  assert nb.cells.index(params) <= 2  # Near the top.
  for name in ('REPO_URL', 'SIZE', 'PRETRAIN_STEPS', 'FINETUNE_STEPS',
               'WORKDIR'):
    assert f'{name} = ' in params.source
  # No made-up repository: the user's clone's URL, or a checkout.
  assert "REPO_URL = ''" in params.source
  # The notebook must pick up Colab's accelerators: never pins the platform.
  assert 'JAX_PLATFORMS' not in json.dumps(nb)


@pytest.mark.slow
def test_notebook_runs(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = str(tmp_path / 'runs')
  override = nbformat.v4.new_code_cell(
      f"SIZE = 'tiny'\nPRETRAIN_STEPS = {STEPS}\n"
      f'FINETUNE_STEPS = {STEPS}\nWORKDIR = {workdir!r}')
  nb.cells.insert(nb.cells.index(tagged(nb, 'parameters')) + 1, override)
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name='python3',
      resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
  # The test pins the kernel to the CPU (the notebook itself never does);
  # it keeps the suite's XLA flags (conftest.py).
  client.execute(env=dict(os.environ, JAX_PLATFORMS='cpu'))

  with open(os.path.join(workdir, 'pretrain', 'eval.json')) as f:
    pretrain_eval = json.load(f)
  assert pretrain_eval['step'] == STEPS
  for key in ('amc_pair_acc', 'itm_acc', 'mlm_acc', 'retrieval_t2i_r1',
              'retrieval_i2t_r1'):
    assert 0 <= pretrain_eval[key] <= 1, key

  rec = os.path.join(workdir, 'rec')
  with open(os.path.join(rec, 'eval.json')) as f:
    rec_eval = json.load(f)
  assert rec_eval['task'] == 'rec' and rec_eval['step'] == STEPS
  for split in ('val', 'test'):
    assert 0 <= rec_eval[split]['accuracy'] <= 1
  with open(os.path.join(rec, 'predictions', 'rec_test.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == rec_eval['test']['num_examples'] > 0
  # Fine-tuning started from the pre-training checkpoint.
  assert any('init_from' in o.get('text', '') and 'parameter arrays' in
             o.get('text', '') for c in nb.cells if c.cell_type == 'code'
             for o in c.outputs)

  # Loss and accuracy curves of both runs, one grid of test examples and
  # one picture drawn by python -m cmal_jax.predict --draw.
  assert len(images(tagged(nb, 'curves'))) == 4
  assert len(images(tagged(nb, 'examples'))) == 1
  assert len(images(tagged(nb, 'predict'))) == 1
  assert os.path.getsize(os.path.join(rec, 'predict.png')) > 0
  for run in ('pretrain', 'rec'):
    for name in ('curves_loss.png', 'curves_accuracy.png'):
      assert os.path.getsize(os.path.join(workdir, run, name)) > 0
