"""Checkpoints with `tf.train.CheckpointManager`, multi-worker aware.

Every worker must take part in a save under MultiWorkerMirroredStrategy; only the chief's copy is
kept (`MODEL_DIR/checkpoints`), the others write into a temporary directory removed after each save.
All workers restore from the chief's directory. TensorFlow writes checkpoint data before it atomically
rewrites the `checkpoint` index file, so a crash during a save leaves the previous checkpoint usable.
"""
from __future__ import annotations

import os
import shutil
import sys

import tensorflow as tf

from convmixer_dist.errors import UsageError


def checkpoint_dir(model_dir: str) -> str:
    """Where the chief keeps its checkpoints."""
    return os.path.join(model_dir, "checkpoints")


class CheckpointSaver:
    """Save every N steps and at the end; restore the chief's latest checkpoint."""

    def __init__(self, checkpoint: tf.train.Checkpoint, model_dir: str, chief: bool, task_id: int,
                 keep: int, subdir: str = "checkpoints"):
        self.checkpoint = checkpoint
        self.chief = chief
        self.main_dir = os.path.join(model_dir, subdir)
        self.directory = self.main_dir if chief else os.path.join(
            model_dir, f".worker{task_id}_tmp_{subdir}")
        self.manager = tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=keep)

    def restore_latest(self) -> str | None:
        """Restore the chief's newest *usable* checkpoint (all workers); returns its path or None.

        A checkpoint whose files are damaged (e.g. a node crashed while a non-atomic file system was
        flushing it) is skipped with a warning in favour of the previous one.
        """
        state = tf.train.get_checkpoint_state(self.main_dir)
        candidates = list(reversed(state.all_model_checkpoint_paths)) if state else []
        for path in candidates:
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
                return path
            except (tf.errors.OpError, ValueError, AssertionError, IndexError) as err:
                print(f"warning: checkpoint {path} is unusable ({err.__class__.__name__}); "
                      "trying the previous one", file=sys.stderr, flush=True)
        if candidates:
            raise UsageError(f"no usable checkpoint in {self.main_dir}; pass --overwrite to start over")
        return None

    def save(self, step: int) -> str:
        """Save (every worker must call this); non-chief copies are deleted right away."""
        if self.chief:
            return self.manager.save(checkpoint_number=step)
        # A fresh manager per save: its bookkeeping must not outlive the directory removed below.
        manager = tf.train.CheckpointManager(self.checkpoint, self.directory, max_to_keep=1)
        path = manager.save(checkpoint_number=step)
        shutil.rmtree(self.directory, ignore_errors=True)
        return path
