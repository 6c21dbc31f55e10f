"""A tool's bad input ends it with one line, `TOOL: error: MESSAGE`, and a
non-zero exit status; --verbose shows the traceback (cli_errors.py).

Each tool is run as its `python -m` entry runs it: cli_errors.run_tool on
its main, in this process; only cmal_jax.main (absl) in a subprocess.
"""

import os
import subprocess
import sys

import pytest

from cmal_jax import cli_errors, report
from cmal_jax.convert import cli as convert
from cmal_jax.convert import inspect as inspect_lib
from cmal_jax.export import export
from cmal_jax.world import task_examples
from configs import pretrain
from cmal_testutil import tsv_row, write_tsv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_entry(capsys, tool, main, *argv):
  """(exit status, stderr lines) of `python -m` TOOL ARGV, in-process."""
  with pytest.raises(SystemExit) as e:
    cli_errors.run_tool(tool, main, argv)
  return e.value.code, capsys.readouterr().err.splitlines()


def assert_one_line(lines, tool, *names):
  """stderr is one line, TOOL: error: ..., naming each of `names`."""
  assert len(lines) == 1, lines
  assert lines[0].startswith(f'{tool}: error: '), lines
  for name in names:
    assert name in lines[0], (name, lines)


def assert_traceback(capsys, tool, main, error, *argv):
  """With --verbose the error propagates: Python prints its traceback."""
  with pytest.raises(error):
    cli_errors.run_tool(tool, main, [*argv, '--verbose'])
  assert capsys.readouterr().err == ''  # Nothing printed on top.


# ------------------------------------------------------------------ helper

def test_error_line_is_one_line_naming_the_tool_once():
  error = ValueError('export: a\n  b\n\nc')
  assert cli_errors.error_line('export', error) == 'export: error: a b c'
  assert cli_errors.error_line('x', ValueError()) == 'x: error: ValueError'


@pytest.mark.parametrize('error', [TypeError('a bug'), KeyError('k'),
                                   KeyboardInterrupt(), SystemExit(3)])
def test_other_exceptions_pass_through_untouched(capsys, error):
  def main(argv):
    raise error
  with pytest.raises(type(error)) as e:
    cli_errors.run_tool('tool', main, [])
  assert e.value is error and capsys.readouterr().err == ''


def test_verbose_prefixes_as_argparse_takes_them():
  assert cli_errors.asks_verbose(['--x', '--verb'])
  assert not cli_errors.asks_verbose(['--', '-v', '--verbosity=1'])


# ------------------------------------------------------------------ tools

def test_convert_truncated_tsv(tmp_path, capsys):
  row = tsv_row(1, [[0, 0, 10, 10]], [[0.5] * 4])
  row[5] = row[5][:-3]  # Truncated features: no longer base64.
  tsv = write_tsv(tmp_path / 'trunc.tsv', [row])
  (tmp_path / 'vocab.txt').write_text('dog\n')
  argv = ['bottom_up', f'--tsv={tsv}', f'--vocab={tmp_path / "vocab.txt"}',
          f'--out={tmp_path / "out"}']
  status, lines = run_entry(capsys, 'convert', convert.main, *argv)
  assert status == 1
  assert_one_line(lines, 'convert', f'{tsv}: line 1: field', 'features')
  assert_traceback(capsys, 'convert', convert.main, ValueError, *argv)


def test_convert_task_without_its_visual_side(tmp_path, capsys):
  argv = ['snli_ve', f'--input={tmp_path / "ve.jsonl"}', '--split=train',
          f'--regions={tmp_path}']
  status, lines = run_entry(capsys, 'convert', convert.main, *argv)
  assert status == 1
  assert_one_line(lines, 'convert', f'{tmp_path}/regions.array_record: no '
                  'such region store')


def test_inspect_missing_path(tmp_path, capsys):
  missing = str(tmp_path / 'missing')
  # inspect returns its status (2: no such path; 1: errors in the report).
  assert cli_errors.run_tool('inspect', inspect_lib.main, [missing]) == 2
  assert_one_line(capsys.readouterr().err.splitlines(), 'inspect', missing)
  assert cli_errors.run_tool('inspect', inspect_lib.main,
                             [missing, '--verbose']) == 2
  err = capsys.readouterr().err
  assert 'Traceback' in err and err.endswith(
      f'inspect: error: {missing}: no such file or folder\n')


def test_export_without_a_checkpoint(tmp_path, capsys):
  (tmp_path / 'config.json').write_text(pretrain.get_config('tiny').to_json())
  argv = [f'--workdir={tmp_path}', f'--out={tmp_path / "x"}']
  status, lines = run_entry(capsys, 'export', export.main, *argv)
  assert status == 1
  assert_one_line(lines, 'export', f'{tmp_path} holds no checkpoint')
  assert_traceback(capsys, 'export', export.main, FileNotFoundError, *argv)


def test_report_missing_workdir(tmp_path, capsys):
  argv = [f'--workdir={tmp_path / "run"}', '--no-plots']
  status, lines = run_entry(capsys, 'report', report.main, *argv)
  assert status == 1
  assert_one_line(lines, 'report', str(tmp_path / 'run'))
  assert_traceback(capsys, 'report', report.main, FileNotFoundError, *argv)


def test_task_examples_bad_feature_dim(tmp_path, capsys):
  argv = [f'--out={tmp_path}', '--tasks=vqa', '--feature_dim=8']
  status, lines = run_entry(capsys, 'task_examples', task_examples.main,
                            *argv)
  assert status == 1
  assert_one_line(lines, 'task_examples', 'feature_dim', '8')
  assert_traceback(capsys, 'task_examples', task_examples.main, ValueError,
                   *argv)


@pytest.mark.parametrize('verbose', [False, True])
def test_main_invalid_config_value(tmp_path, verbose):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'cmal_jax.main',
       '--config=configs/pretrain.py:tiny', f'--workdir={workdir}',
       '--config.model.num_heads=3', *(['--verbose'] * verbose)],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 1
  line = ('main: error: config.model.num_heads=3: must divide '
          'model.hidden_dim=64')
  if verbose:
    assert 'Traceback' in proc.stderr and 'ValueError' in proc.stderr
  else:
    assert proc.stderr.splitlines() == [line]
  assert not workdir.exists()  # Validation comes first.
