"""Checkpoints with `tf.train.CheckpointManager`, multi-worker aware.

Every worker must take part in a save under MultiWorkerMirroredStrategy; only the chief's copy is
kept (`MODEL_DIR/checkpoints`), the others write into a temporary directory removed after each save.
All workers restore from the chief's directory. TensorFlow writes checkpoint data before it atomically
rewrites the `checkpoint` index file, so a crash during a save leaves the previous checkpoint usable.
"""
from __future__ import annotations

import os
import shutil

import tensorflow as tf


def checkpoint_dir(model_dir: str) -> str:
    """Where the chief keeps its checkpoints."""
    return os.path.join(model_dir, "checkpoints")


class CheckpointSaver:
    """Save every N steps and at the end; restore the chief's latest checkpoint."""

    def __init__(self, checkpoint: tf.train.Checkpoint, model_dir: str, chief: bool, task_id: int,
                 keep: int):
        self.checkpoint = checkpoint
        self.chief = chief
        self.main_dir = checkpoint_dir(model_dir)
        self.directory = self.main_dir if chief else os.path.join(
            model_dir, f".worker{task_id}_tmp_checkpoints")
        self.keep = keep
        self.manager = tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=keep)

    def latest(self) -> str | None:
        """Path of the chief's latest checkpoint, or None."""
        return tf.train.latest_checkpoint(self.main_dir)

    def restore_latest(self) -> str | None:
        """Restore the chief's latest checkpoint (all workers); returns its path or None."""
        path = self.latest()
        if path:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        return path

    def save(self, step: int) -> str:
        """Save (every worker must call this); non-chief copies are deleted right away."""
        if self.chief:
            return self.manager.save(checkpoint_number=step)
        # A fresh manager per save: its bookkeeping must not outlive the directory removed below.
        manager = tf.train.CheckpointManager(self.checkpoint, self.directory, max_to_keep=1)
        path = manager.save(checkpoint_number=step)
        shutil.rmtree(self.directory, ignore_errors=True)
        return path
