"""Checkpoints with `tf.train.CheckpointManager`, multi-worker aware, and never lost.

Every worker must take part in a save under MultiWorkerMirroredStrategy; only the chief's copy is
kept (`MODEL_DIR/checkpoints`), the others write into a temporary directory removed after each save.
All workers restore from the chief's directory. TensorFlow writes checkpoint data before it atomically
rewrites the `checkpoint` index file, so a crash during a save leaves the previous checkpoint usable.

Damage is survived without losing data: an unreadable `checkpoint` index (garbage, zero bytes) is
moved aside and rebuilt from the `ckpt-N` files on disk; a checkpoint that cannot be restored is
skipped for the previous one and its files are renamed `unusable-ckpt-N.*` (kept, never overwritten
by the resumed run); and when checkpoints exist but none is usable, the run stops instead of starting
over on top of them.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import sys
import time

import tensorflow as tf

from convmixer_dist import outputs
from convmixer_dist.errors import DiskFull, UsageError, is_disk_full

INDEX_FILE = "checkpoint"


def checkpoint_dir(model_dir: str) -> str:
    """Where the chief keeps its checkpoints."""
    return os.path.join(model_dir, "checkpoints")


def checkpoints_on_disk(directory: str) -> list[str]:
    """Prefixes `DIR/ckpt-N` with an .index file, newest (highest N) first."""
    found = []
    for index in glob.glob(os.path.join(directory, "ckpt-*.index")):
        match = re.fullmatch(r"ckpt-(\d+)\.index", os.path.basename(index))
        if match:
            found.append((int(match.group(1)), os.path.abspath(index[:-len(".index")])))
    return [prefix for _, prefix in sorted(found, reverse=True)]


def read_index(directory: str) -> list[str] | None:
    """The checkpoints the `checkpoint` index lists (oldest first); None if the index is missing
    or unreadable (TensorFlow returns None for garbage and raises for a zero-byte file)."""
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # TensorFlow logs two lines for a garbage index; the caller reports one.
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (ValueError, tf.errors.OpError):
        return None
    finally:
        logger.setLevel(level)
    if state is None:
        return None
    # TensorFlow has already joined relative entries to `directory`; joining again doubled a
    # relative --model_dir (runs/x/checkpoints/runs/x/checkpoints/ckpt-N).
    return [os.path.abspath(p) for p in state.all_model_checkpoint_paths]


def latest_checkpoint(directory: str) -> str | None:
    """The newest checkpoint: the index's, or (index missing or damaged) the newest ckpt-N on disk."""
    listed = read_index(directory)
    return listed[-1] if listed else (checkpoints_on_disk(directory) or [None])[0]


def _rebuild_index(directory: str) -> None:
    """Rewrite the `checkpoint` index from the ckpt-N files on disk (atomic, like TensorFlow's)."""
    prefixes = list(reversed(checkpoints_on_disk(directory)))
    if prefixes:  # TensorFlow's text format, names relative to the directory (a moved run still works)
        names = [os.path.basename(p) for p in prefixes]
        outputs.write_text(os.path.join(directory, INDEX_FILE), "".join(
            [f'model_checkpoint_path: "{names[-1]}"\n'] + [f'all_model_checkpoint_paths: "{n}"\n' for n in names]))
    elif os.path.exists(os.path.join(directory, INDEX_FILE)):
        os.remove(os.path.join(directory, INDEX_FILE))


def repair_index(directory: str) -> str | None:
    """If `checkpoint` exists but is unreadable, or misses ckpt-N files on disk newer than the
    ones it lists, move it aside and rebuild it from disk; returns a warning line, else None."""
    path = os.path.join(directory, INDEX_FILE)
    if not os.path.exists(path):
        return None
    listed = read_index(directory)
    on_disk = checkpoints_on_disk(directory)
    if listed is not None and (not on_disk or on_disk[0] in listed):
        return None
    kept = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, kept)
    _rebuild_index(directory)
    return (f"warning: {path} was unreadable; rebuilt it from the {len(on_disk)} checkpoint(s) on disk "
            f"(the damaged file is kept as {os.path.basename(kept)})")


def _set_aside(prefix: str) -> str:
    """Rename the files of checkpoint `prefix` to unusable-ckpt-N.* (kept, out of every lookup)."""
    directory, name = os.path.split(prefix)
    for path in glob.glob(glob.escape(prefix) + ".*"):
        os.replace(path, os.path.join(directory, "unusable-" + os.path.basename(path)))
    return f"unusable-{name}.*"


def _save_files(directory: str, step: int) -> dict[str, tuple[int, int, int]]:
    """{path: (inode, size, mtime ns)} of `ckpt-STEP.*` and `ckpt-STEP_temp` in `directory`."""
    prefix = glob.escape(os.path.join(directory, f"ckpt-{step}"))
    found = {}
    for path in glob.glob(prefix + ".*") + glob.glob(prefix + "_temp"):
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            found[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return found


def remove_partial_save(directory: str, step: int, before: dict[str, tuple[int, int, int]]) -> str:
    """Remove what a save of ckpt-STEP that did not finish wrote (files new or changed since
    `before`, a `_save_files` snapshot; an older complete ckpt-STEP it never touched is kept), and
    rebuild the index if it names a removed checkpoint. Returns the names removed, comma-separated."""
    removed = []
    for path, state in sorted(_save_files(directory, step).items()):
        if before.get(path) == state:
            continue
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(os.path.basename(path))
    prefix = os.path.abspath(os.path.join(directory, f"ckpt-{step}"))
    if removed and prefix in (read_index(directory) or []):
        with contextlib.suppress(OSError, tf.errors.OpError):
            _rebuild_index(directory)  # On a full disk this may fail too: repair_index redoes it.
    return ", ".join(removed)


def latest_complete(directory: str) -> str | None:
    """The newest checkpoint in `directory` whose .index is not empty and has its data files."""
    for prefix in checkpoints_on_disk(directory):
        index = prefix + ".index"
        if os.path.getsize(index) and glob.glob(glob.escape(prefix) + ".data-*"):
            return prefix
    return None


class CheckpointSaver:
    """Save every N steps and at the end; restore the chief's latest usable checkpoint."""

    def __init__(self, checkpoint: tf.train.Checkpoint, model_dir: str, chief: bool, task_id: int,
                 keep: int, subdir: str = "checkpoints"):
        self.checkpoint = checkpoint
        self.chief = chief
        self.main_dir = os.path.join(model_dir, subdir)
        self.directory = self.main_dir if chief else os.path.join(
            model_dir, f".worker{task_id}_tmp_{subdir}")
        self.keep = keep
        if chief and os.path.isdir(self.main_dir):
            warning = repair_index(self.main_dir)
            if warning:
                print(warning, file=sys.stderr, flush=True)
        self.manager = tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=keep)

    def candidates(self) -> list[str]:
        """Checkpoints to try, newest first: the index's, then any other ckpt-N on disk."""
        listed = list(reversed(read_index(self.main_dir) or []))
        return listed + [p for p in checkpoints_on_disk(self.main_dir) if p not in listed]

    def restore_latest(self) -> str | None:
        """Restore the chief's newest *usable* checkpoint (all workers); returns its path or None.

        A checkpoint whose files are damaged (e.g. a node crashed while a non-atomic file system was
        flushing it) is skipped in favour of the previous one, with one warning line; the chief
        renames its files so that the resumed run never overwrites them.
        """
        candidates = self.candidates()
        unusable = []
        for path in candidates:
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except (tf.errors.OpError, ValueError, AssertionError, IndexError) as err:
                unusable.append((path, err.__class__.__name__))
                continue
            if unusable:
                self._set_aside_unusable(unusable, f"resumed from {os.path.basename(path)}")
            return path
        if candidates:
            names = ", ".join(f"{os.path.basename(p)} ({kind})" for p, kind in unusable)
            raise UsageError(f"no usable checkpoint in {self.main_dir}: {names}; pass --overwrite to "
                             "move the run aside and start over")
        return None

    def _set_aside_unusable(self, unusable: list[tuple[str, str]], outcome: str) -> None:
        names = ", ".join(f"{os.path.basename(p)} ({kind})" for p, kind in unusable)
        kept = ""
        if self.chief:
            kept = "; kept as " + ", ".join(_set_aside(p) for p, _ in unusable)
            _rebuild_index(self.main_dir)
            self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory,
                                                      max_to_keep=self.keep)
        print(f"warning: unusable checkpoint(s) {names}; {outcome}{kept}", file=sys.stderr, flush=True)

    def save(self, step: int) -> str:
        """Save (every worker must call this); non-chief copies are deleted right away.

        A save that fails (a full disk, an I/O error) removes what it wrote of ckpt-N, so no
        half-written checkpoint can be mistaken for a good one: TensorFlow leaves, by how far it
        got, an empty or partial `ckpt-N_temp` directory, or a complete `.data` file beside a
        zero-byte `.index`. A full disk then raises DiskFull naming the last complete checkpoint."""
        before = _save_files(self.directory, step)
        try:
            if self.chief:
                return self.manager.save(checkpoint_number=step)
            # A fresh manager per save: its bookkeeping must not outlive the directory removed below.
            manager = tf.train.CheckpointManager(self.checkpoint, self.directory, max_to_keep=1)
            path = manager.save(checkpoint_number=step)
            shutil.rmtree(self.directory, ignore_errors=True)
            return path
        except BaseException as err:
            removed = remove_partial_save(self.directory, step, before)
            if not self.chief:
                shutil.rmtree(self.directory, ignore_errors=True)
            if not is_disk_full(err):
                raise
            last = latest_complete(self.main_dir)
            raise DiskFull(
                f"no space left on device saving checkpoint {step} in {self.directory}; removed its "
                f"partial files ({removed or 'none'}); the last complete checkpoint is "
                f"{last or 'none (no checkpoint was saved yet)'}; free space and rerun the same "
                "command to resume") from err
