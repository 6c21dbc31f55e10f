"""A command-line tool's bad-input error as one line, not a traceback.

Every `python -m cmal_jax...` tool runs its main through `run_tool` (or,
inside an absl main, `errors_as_one_line`): an error that is the user's
(USER_ERRORS) prints

  TOOL: error: MESSAGE

on one line to stderr and exits with status EXIT_STATUS (1); `--verbose`
(add_verbose_flag) lets it propagate, traceback and all. Any other
exception is a bug in our code and keeps its traceback; SystemExit and
KeyboardInterrupt pass through untouched. The tools' main(argv) functions
still raise, so library callers and tests see the exception itself.

Exit statuses: 1 for bad input (this module, and `sys.exit(message)`
elsewhere); 2 for a bad command line (argparse).
"""

import contextlib
import sys

# The user's errors: our readers and checks raise ValueError for bad input
# (FormatError, RecordError, ImageError, configlib.validate, refused
# resumes), and OSError is the file system's (a missing file, an existing
# output folder, a full disk, no permission). KeyError is left out: ours
# come from lookups that are bugs, and its message is only the key.
USER_ERRORS = (ValueError, OSError)
EXIT_STATUS = 1
VERBOSE_FLAG = '--verbose'
VERBOSE_HELP = ('On an error in the input, show its traceback (default: '
                'one line, TOOL: error: MESSAGE).')


def add_verbose_flag(parser):
  """Adds --verbose, which run_tool reads from the command line, to an
  argparse parser (each sub-command's parser too: argparse does not pass
  a parent's flags on to them)."""
  parser.add_argument(VERBOSE_FLAG, action='store_true', help=VERBOSE_HELP)


def asks_verbose(argv) -> bool:
  """Whether the command line has --verbose, or a prefix of it that
  argparse would take for it (--verb; not the bare --)."""
  return any(len(a) > 2 and VERBOSE_FLAG.startswith(a) for a in argv)


def error_line(tool: str, error: BaseException) -> str:
  """`TOOL: error: MESSAGE`, one line: the message's line breaks become
  spaces (no message of ours is meant to be read over several lines), and
  a message that already names the tool does not name it twice."""
  message = ' '.join(l.strip() for l in str(error).splitlines() if l.strip())
  message = message.removeprefix(f'{tool}: ') or type(error).__name__
  return f'{tool}: error: {message}'


@contextlib.contextmanager
def errors_as_one_line(tool: str, verbose: bool, errors=USER_ERRORS):
  """Turns an `errors` exception raised inside into error_line on stderr
  and exit status EXIT_STATUS, unless `verbose`, which re-raises it.

  Every process of a multi-process job that raises exits so, non-zero.
  """
  try:
    yield
  except errors as e:
    if verbose:
      raise
    print(error_line(tool, e), file=sys.stderr, flush=True)
    raise SystemExit(EXIT_STATUS) from e


def run_tool(tool: str, main, argv=None):
  """Returns main(argv) (argv: default sys.argv[1:]), its user errors
  reported as one line unless argv asks for --verbose.

  For a tool's `if __name__ == '__main__':` block; its parser needs
  add_verbose_flag.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  with errors_as_one_line(tool, asks_verbose(argv)):
    return main(argv)
