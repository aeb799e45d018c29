"""checkpoint: the `checkpoint` index read back for a relative --model_dir as for an absolute one."""
from __future__ import annotations

import os

import tensorflow as tf

from convmixer_dist import checkpoint


def test_index_of_a_relative_model_dir_names_the_checkpoints_on_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --model_dir=runs/x, as the README's quickstart writes it
    directory = checkpoint.checkpoint_dir("runs/x")
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), directory, max_to_keep=3)
    manager.save(checkpoint_number=1)
    manager.save(checkpoint_number=2)
    expected = [os.path.abspath(os.path.join(directory, f"ckpt-{n}")) for n in (1, 2)]
    assert checkpoint.read_index(directory) == expected
    assert checkpoint.latest_checkpoint(directory) == expected[-1]
    assert checkpoint.read_index(os.path.abspath(directory)) == expected
