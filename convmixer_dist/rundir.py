"""The model directory: created only once the inputs are known to be valid, with the run's flags.

Layout: flags.txt (resolved flags but --model_dir: the run is where its directory is now), checkpoints/ (with identity.json: the flags the
checkpoints depend on, written once), train/ and eval/ (TensorBoard events), plugins/profile/
(profiles), summary.json, and .lock while a run uses the directory. A directory that already holds a
run is resumed, but only by a run with the same identity; `--overwrite` moves it aside (never deletes it).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
import stat
import time

from convmixer_dist.config import IDENTITY_FIELDS, Config, flag_text, read_flagfile
from convmixer_dist.errors import UsageError
# The run directory's files are written through these (callers also write rundir.write_json(...)).
from convmixer_dist.outputs import (  # noqa: F401
    atomic_output, check_path_length, ensure_writable_dir, ensure_writable_file, write_bytes,
    write_json, write_text)
from convmixer_dist.seeds import DATA_ORDER, check_data_order

FLAGS_FILE = "flags.txt"


IDENTITY_FILE = os.path.join("checkpoints", "identity.json")
LOCK_FILE = ".lock"
# Entries of MODEL_DIR that belong to this invocation, not to the run: --overwrite leaves them in
# place (a launcher is writing to logs/ while the run starts; the lock is this process's).
NOT_MOVED = ("logs", LOCK_FILE)


# The identity's record of the seed rule the run's example order follows (`seeds.DATA_ORDER`);
# runs of versions before it have none (order 1).
DATA_ORDER_KEY = "data_order"


def run_identity(config: Config) -> dict[str, str]:
    """The flags a checkpoint's shape and meaning depend on, as flagfile text, and the data order."""
    identity = {name: flag_text(getattr(config, name)) for name in IDENTITY_FIELDS}
    identity[DATA_ORDER_KEY] = str(DATA_ORDER)
    return identity


def _has_checkpoints(model_dir: str) -> bool:
    return any(glob.glob(os.path.join(model_dir, sub, "ckpt-*"))
               for sub in ("checkpoints", "best_checkpoint"))


def _recorded_identity(model_dir: str) -> tuple[dict[str, str], str] | None:
    """(identity, source file) of the run in MODEL_DIR: checkpoints/identity.json, written once with
    the first checkpoint and never changed, else (runs of older versions) flags.txt; None if neither."""
    path = os.path.join(model_dir, IDENTITY_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                identity = json.load(f)
            if not isinstance(identity, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as err:
            raise UsageError(f"{path} is unreadable ({err.__class__.__name__}): the checkpoints' run "
                             "identity is unknown; use --overwrite to start a new run") from None
        return {k: str(v) for k, v in identity.items()}, path
    path = os.path.join(model_dir, FLAGS_FILE)
    if os.path.isfile(path):
        try:
            return read_flagfile(path), path
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"{path} is unreadable ({err.__class__.__name__}); use --overwrite") from None
    return None


def check_resume_compatible(config: Config) -> None:
    """UsageError listing the identity flags that differ from the run already in MODEL_DIR, or when
    MODEL_DIR holds checkpoints whose identity is recorded nowhere (resuming could mix two runs)."""
    recorded = _recorded_identity(config.model_dir)
    if recorded is None:
        if _has_checkpoints(config.model_dir):
            raise UsageError(f"--model_dir={config.model_dir} holds checkpoints but neither {IDENTITY_FILE} "
                             f"nor {FLAGS_FILE} says which run wrote them; resume with "
                             f"--flagfile=<that run's flags>, pick another --model_dir, or pass "
                             f"--overwrite to move the old run aside")
        return
    previous, source = recorded
    differing = [f"--{name}={value} (was {previous[name]})"
                 for name, value in run_identity(config).items()
                 if name in previous and previous[name] != value]
    if differing:
        raise UsageError(f"--model_dir={config.model_dir} holds a run with other flags "
                         f"({os.path.basename(source)}): {', '.join(differing)}; resume with the same "
                         f"flags, pick another --model_dir, or pass --overwrite to move the old run aside")
    if _has_checkpoints(config.model_dir):
        check_data_order(config, previous.get(DATA_ORDER_KEY, "1"))



CHECKPOINT_SUBDIRS = ("checkpoints", "best_checkpoint")
_INDEX_PATH = re.compile(r'^((?:model_checkpoint_path|all_model_checkpoint_paths): )"([^"]*)"$', re.M)


def localize_checkpoint_indexes(model_dir: str) -> None:
    """Make each `checkpoint` index in MODEL_DIR name its checkpoints relative to its own directory.
    An index rebuilt from the files on disk (checkpoint.py) lists absolute paths: in a copied or
    moved run they point at the original place, whose checkpoints resuming would restore and then
    rotate away."""
    for sub in CHECKPOINT_SUBDIRS:
        path = os.path.join(model_dir, sub, "checkpoint")
        try:
            with open(path) as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue  # Missing, or unreadable: checkpoint.repair_index rebuilds it.
        local = _INDEX_PATH.sub(lambda m: f'{m.group(1)}"{os.path.basename(m.group(2))}"', text)
        if local != text:
            write_text(path, local)


def last_complete_checkpoint(model_dir: str) -> str | None:
    """MODEL_DIR/checkpoints/ckpt-N that the `checkpoint` index names last, if its files are there
    (TensorFlow rewrites the index only after a save is complete); None if there is none. Read as
    text, without TensorFlow, to name it in a message."""
    directory = os.path.join(model_dir, "checkpoints")
    try:
        with open(os.path.join(directory, "checkpoint"), encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    named = [m.group(2) for m in _INDEX_PATH.finditer(text)
             if m.group(1).startswith("model_checkpoint_path")]
    if not named:
        return None
    prefix = os.path.join(directory, os.path.basename(named[0]))
    index = prefix + ".index"
    if not os.path.isfile(index) or not os.path.getsize(index) or not glob.glob(glob.escape(prefix) + ".data-*"):
        return None
    return prefix


def remove_stale_temp_checkpoints(model_dir: str) -> list[str]:
    """Remove `ckpt-N_temp` directories of MODEL_DIR: TensorFlow's half-written saves (a save
    interrupted by a second Ctrl-C or a kill), which no later save cleans; returns what it removed.
    Only this run's chief calls it, under the run lock, so no save of another process is running."""
    removed = []
    for sub in CHECKPOINT_SUBDIRS:
        for path in sorted(glob.glob(os.path.join(glob.escape(model_dir), sub, "*_temp"))):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
                removed.append(path)
    return removed


def _refuse_overwriting_a_working_directory(model_dir: str) -> None:
    """--overwrite moves everything in MODEL_DIR: never the current directory or one holding it."""
    here, target = os.path.realpath(os.getcwd()), os.path.realpath(model_dir)
    if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
        raise UsageError(f"--model_dir={model_dir} --overwrite: {model_dir} is the current directory "
                         "or holds it; --overwrite would move everything in it aside (unrelated files "
                         "too); pass a run's own directory, e.g. --model_dir=runs/NAME")


def move_aside(model_dir: str) -> str | None:
    """Move the run in MODEL_DIR (everything but `NOT_MOVED`) into MODEL_DIR.old-TIMESTAMP; returns
    that directory, or None when there was nothing to move. MODEL_DIR itself stays (a launcher's
    logs/ and open log files keep their place)."""
    if not os.path.isdir(model_dir):
        return None
    entries = sorted(e for e in os.listdir(model_dir) if e not in NOT_MOVED)
    if not entries:
        return None
    # Beside MODEL_DIR (its parent's entry), also for a MODEL_DIR spelled with a trailing / or as ".".
    target = f"{os.path.abspath(model_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while os.path.exists(target if not suffix else f"{target}-{suffix}"):
        suffix += 1
    target = target if not suffix else f"{target}-{suffix}"
    os.makedirs(target)
    for entry in entries:
        os.rename(os.path.join(model_dir, entry), os.path.join(target, entry))
    return target


def prepare_model_dir(config: Config, chief: bool) -> str | None:
    """Lock MODEL_DIR (chief), check/move aside an existing run, create MODEL_DIR, write the run
    identity (once) and flags.txt on the chief.

    Returns where an old run was moved by --overwrite (None otherwise).
    """
    ensure_writable_dir(config.model_dir, f"--model_dir={config.model_dir}")
    if chief:
        acquire_run_lock(config.model_dir)
    try:
        return _prepare_locked(config, chief)
    except BaseException:
        release_run_lock(config.model_dir)
        raise


def _prepare_locked(config: Config, chief: bool) -> str | None:
    moved = None
    if config.overwrite:
        _refuse_overwriting_a_working_directory(config.model_dir)
        if chief:
            try:
                moved = move_aside(config.model_dir)
            except OSError as err:
                raise UsageError(f"--overwrite: cannot move {config.model_dir} aside "
                                 f"({err.strerror})") from None
    else:
        check_resume_compatible(config)
        if chief:
            localize_checkpoint_indexes(config.model_dir)
            for path in remove_stale_temp_checkpoints(config.model_dir):
                print(f"removed {path}: a save that never finished", flush=True)
    if chief:
        identity = os.path.join(config.model_dir, IDENTITY_FILE)
        if not os.path.isfile(identity):
            os.makedirs(os.path.dirname(identity), exist_ok=True)
            write_json(identity, run_identity(config))
        write_text(os.path.join(config.model_dir, FLAGS_FILE), config.to_flagfile())
    return moved


# ------------------------------------------------------------------------------------ run lock
def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (Linux /proc, in clock ticks), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the lock's process still runs (only decidable on its own host)."""
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = holder.get("start")
    return start is None or _process_start(pid) in (None, start)


# The largest process id Linux can hand out (PID_MAX_LIMIT, 2**22); a lock naming a pid outside
# 1..PID_MAX is not one this program wrote (0 and negative pids mean process groups to kill()).
PID_MAX = 2 ** 22
_LOCK_MAX_BYTES = 4096


class _NotALock(Exception):
    """MODEL_DIR/.lock exists but is not a lock this program writes; the message says why."""


def _read_lock(path: str) -> dict | None:
    """The holder of the lock at `path`: {"pid", "host", "start", "since"}; None if there is no lock.

    The rule for anything else there: a lock is a regular file of at most 4 KiB holding a JSON
    object with `pid` an integer in 1..PID_MAX and `host` a non-empty string (`start`, `since`:
    strings if present). Any other content (not JSON, other types, an impossible pid, a directory,
    a link, a FIFO) raises _NotALock: it cannot be checked, so it is reported, never taken over."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as err:
        why = "a symbolic link" if err.errno == errno.ELOOP else err.strerror
        raise _NotALock(why) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotALock("not a regular file")
        raw = os.read(fd, _LOCK_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > _LOCK_MAX_BYTES:
        raise _NotALock(f"larger than {_LOCK_MAX_BYTES} bytes")
    try:
        holder = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise _NotALock("empty" if not raw.strip() else "not JSON") from None
    if not isinstance(holder, dict):
        raise _NotALock("not a JSON object")
    pid, host = holder.get("pid"), holder.get("host")
    if type(pid) is not int or not 1 <= pid <= PID_MAX:
        raise _NotALock(f"pid {str(pid)[:40]} is not a process id")
    if not isinstance(host, str) or not host:
        raise _NotALock("no host name")
    if not all(isinstance(holder.get(key), (str, type(None))) for key in ("start", "since")):
        raise _NotALock("start or since is not a string")
    return holder


def acquire_run_lock(model_dir: str) -> None:
    """Take MODEL_DIR/.lock (pid, host, start time) or raise a UsageError naming the process that
    holds it. A lock left by a process that died on this host is stale and taken over; a lock from
    another host cannot be checked and is reported (delete it if that process is gone), and so is a
    file there that is not a lock (see _read_lock)."""
    path = os.path.join(model_dir, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        tmp = f"{path}.{me['pid']}.tmp"
        with open(tmp, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())  # A crash right after the link must not leave an empty lock.
        try:
            os.link(tmp, path)  # Atomic and never half-written: the lock appears complete or not at all.
            _HELD.add(os.path.abspath(path))
            return
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        try:
            holder = _read_lock(path)
        except _NotALock as why:
            raise UsageError(f"--model_dir={model_dir}: {path} is not a run lock ({why}); delete it "
                             "if no run uses this directory") from None
        if holder is None:
            continue  # Released meanwhile: try again.
        if holder["pid"] == me["pid"] and holder["host"] == me["host"]:
            _HELD.add(os.path.abspath(path))
            return  # This process already holds it (a second run in one process, e.g. tests).
        if holder["host"] != me["host"] or _alive(holder):
            raise UsageError(f"--model_dir={model_dir} is in use by pid {holder['pid']} on "
                             f"{holder['host']} (since {holder.get('since') or '?'}); wait for it to finish, "
                             f"pick another --model_dir, or delete {path} if that process is gone")
        # Stale (its process is dead): take it over, unless it changed meanwhile.
        with contextlib.suppress(_NotALock):
            if _read_lock(path) == holder:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    raise UsageError(f"--model_dir={model_dir}: could not take {path}; another run keeps taking it")


def release_run_lock(model_dir: str) -> None:
    """Remove MODEL_DIR/.lock if this process holds it (also run at exit)."""
    path = os.path.abspath(os.path.join(model_dir, LOCK_FILE))
    if path not in _HELD:
        return
    _HELD.discard(path)
    try:
        holder = _read_lock(path)
    except _NotALock:
        return  # Replaced by something else meanwhile: not this process's to remove.
    if holder is not None and holder["pid"] == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


_HELD: set[str] = set()


@atexit.register
def release_all_locks() -> None:
    """Release every lock this process holds (at exit, and before an immediate exit)."""
    for path in list(_HELD):
        release_run_lock(os.path.dirname(path))
