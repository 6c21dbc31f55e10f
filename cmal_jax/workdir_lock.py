"""One writer per workdir: a lock taken when a run starts, released when it
ends.

The lock is workdir/lock.json: the holder's host, pid, start time and a
heartbeat that a daemon thread refreshes every HEARTBEAT_SECONDS. A second
start on a held workdir fails at once, naming the holder, before it writes
anything. A lock is stale, and taken over with a log line, when its holder's
process is gone (same host; a run killed with SIGKILL leaves its lock) or its
heartbeat is older than STALE_AFTER_SECONDS (a holder on another host that
died, e.g. a preempted pod whose job is re-submitted to other machines).

A local lock is created with O_EXCL, so of two starts only one takes it. On
gs:// there is no exclusive create through etils.epath: two starts within
the same second could both find the workdir free, so there the scheduler
must not start a job twice at once (a later second start is refused).
With several processes, process 0 holds the lock for all of them.
"""

import contextlib
import json
import os
import socket
import threading
import time
import uuid

import jax
from jax.experimental import multihost_utils
import numpy as np

from cmal_jax import storage
from cmal_jax.logs import log

LOCK_FILE = 'lock.json'
HEARTBEAT_SECONDS = 60
STALE_AFTER_SECONDS = 600


class WorkdirInUse(RuntimeError):
  """Another live run holds the workdir's lock."""


def _process_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  return True


def stale_reason(holder, now=None):
  """Why the lock `holder` (lock.json's content) is stale, or '' if it may
  be live."""
  now = time.time() if now is None else now
  if holder.get('host') == socket.gethostname() and not _process_alive(
      holder.get('pid', -1)):
    return f'its process {holder.get("pid")} on this host is gone'
  age = now - holder.get('heartbeat', 0)
  if age > STALE_AFTER_SECONDS:
    return (f'its heartbeat is {age:.0f} s old (stale after '
            f'{STALE_AFTER_SECONDS} s)')
  return ''


def describe(holder, path):
  started = time.strftime('%Y-%m-%d %H:%M:%S',
                          time.localtime(holder.get('started', 0)))
  age = time.time() - holder.get('heartbeat', 0)
  return (f'{os.path.dirname(os.fspath(path))} is in use by another run: '
          f'host {holder.get("host")}, pid {holder.get("pid")}, started '
          f'{started} (heartbeat {age:.0f} s ago). Wait for it to end or use '
          f'another --workdir. If that run is gone, its lock is taken over '
          f'once its heartbeat is {STALE_AFTER_SECONDS} s old, or remove '
          f'{path}.')


def _create_exclusive(path, text):
  """Creates `path` holding `text`; False if it exists. Atomic locally."""
  if storage.is_remote(path):
    if path.exists():
      return False
    path.write_text(text)
    return True
  try:
    fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    f.write(text)
  return True


class WorkdirLock:
  """The lock this process holds on a workdir; refreshes its heartbeat
  until release()."""

  def __init__(self, workdir):
    self.path = storage.workdir_path(workdir, LOCK_FILE)
    now = time.time()
    self.content = dict(host=socket.gethostname(), pid=os.getpid(),
                        started=now, heartbeat=now, token=uuid.uuid4().hex)
    self._stop = threading.Event()
    self._thread = None

  def acquire(self):
    """Takes the lock, or raises WorkdirInUse naming the holder."""
    for _ in range(3):  # A concurrent release or take-over: look again.
      if _create_exclusive(self.path, json.dumps(self.content)):
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name='workdir-lock-heartbeat')
        self._thread.start()
        return self
      try:
        holder = json.loads(self.path.read_text())
      except (FileNotFoundError, json.JSONDecodeError):
        # Released meanwhile, or being written: look again shortly.
        time.sleep(0.1)
        continue
      reason = stale_reason(holder)
      if not reason:
        raise WorkdirInUse(describe(holder, self.path))
      log(f'{self.path}: taking over the lock of host {holder.get("host")}, '
          f'pid {holder.get("pid")}: {reason}.')
      self._remove_if(holder.get('token'))
    raise WorkdirInUse(f'{self.path}: could not take the lock (another start '
                       'is taking it at the same time).')

  def _read_token(self):
    try:
      return json.loads(self.path.read_text()).get('token')
    except (FileNotFoundError, json.JSONDecodeError):
      return None

  def _remove_if(self, token):
    """Removes the lock file if it still holds `token`."""
    if self._read_token() == token:
      with contextlib.suppress(FileNotFoundError):
        self.path.unlink()

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_SECONDS):
      if self._read_token() != self.content['token']:
        return  # Taken over (we were presumed dead): leave it alone.
      self.content['heartbeat'] = time.time()
      try:
        storage.write_text_atomic(self.path, json.dumps(self.content))
      except OSError as e:  # A full disk must not kill the run.
        log(f'{self.path}: heartbeat not written ({e}).')

  def release(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    self._remove_if(self.content['token'])


@contextlib.contextmanager
def hold(workdir):
  """Holds `workdir`'s lock for the body (process 0 for all processes);
  raises WorkdirInUse at once, on every process, if another run holds it."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except WorkdirInUse as e:
      error = e
  if jax.process_count() > 1:
    taken = multihost_utils.broadcast_one_to_all(np.int32(lock is not None))
    if not taken and error is None:
      error = WorkdirInUse(f'{workdir}: process 0 could not take the '
                           'workdir lock; its log says which run holds it.')
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
