"""Checkpoint saves on a file system that fills up, at every fill level around the checkpoint's
size (run by tests/test_disk_full.py inside `unshare -m` on a small tmpfs mounted at argv[1]).
Prints one JSON line per fill level: what the save raised, the files left, what restores."""
import glob
import json
import os
import sys

from convmixer_dist.runtime import quiet_tensorflow_import

quiet_tensorflow_import()
import tensorflow as tf  # noqa: E402

from convmixer_dist import checkpoint, errors  # noqa: E402


def fill(directory: str, leave_pages: int) -> None:
    """Make the file system hold only `leave_pages` free pages (a filler file takes the rest)."""
    filler = os.path.join(directory, "filler")
    open(filler, "wb").close()
    free = os.statvfs(directory).f_bavail
    with open(filler, "wb") as f:
        f.write(b"\0" * os.statvfs(directory).f_frsize * max(0, free - leave_pages))


def main() -> None:
    root, levels = sys.argv[1], range(int(sys.argv[2]), int(sys.argv[3]))
    weights = tf.Variable(tf.range(30000, dtype=tf.float32))  # ~120 kB of checkpoint data
    saver = checkpoint.CheckpointSaver(tf.train.Checkpoint(w=weights), root, chief=True, task_id=0,
                                       keep=3)
    saver.save(1)
    for leave in levels:
        fill(root, leave)
        weights.assign_add(tf.ones_like(weights))
        outcome = {"leave": leave}
        try:
            outcome["saved"] = os.path.basename(saver.save(2))
        except errors.DiskFull as err:
            outcome["disk_full"] = str(err)
            outcome["stage"] = str(err.__cause__).split(";")[0].split("/")[-1]
        left = sorted(os.path.basename(p) for p in glob.glob(os.path.join(saver.main_dir, "ckpt-2*")))
        outcome["left"] = left
        os.remove(os.path.join(root, "filler"))
        restored = tf.Variable(tf.zeros_like(weights))
        path = checkpoint.CheckpointSaver(tf.train.Checkpoint(w=restored), root, chief=True, task_id=0,
                                          keep=3).restore_latest()
        outcome["restored"] = os.path.basename(path)
        outcome["restored_first"] = float(restored[1].numpy())
        print(json.dumps(outcome), flush=True)
        for name in left:  # the next fill level saves ckpt-2 again from scratch
            target = os.path.join(saver.main_dir, name)
            tf.io.gfile.rmtree(target) if os.path.isdir(target) else os.remove(target)
        saver = checkpoint.CheckpointSaver(tf.train.Checkpoint(w=weights), root, chief=True,
                                           task_id=0, keep=3)


if __name__ == "__main__":
    main()
