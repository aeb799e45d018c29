"""Convert an image-folder tree into sharded TFRecords for `--dataset=tfrecord`.

    python -m convmixer_dist.commands.make_tfrecords --data_dir=IMAGE_FOLDER --output=DIR --shards=1024 \
        [--eval_shards=128] [--label_offset=1] [--seed=0]

IMAGE_FOLDER is the `--dataset=image_folder` layout (IMAGE_FOLDER/train/<class>/*.jpg and
IMAGE_FOLDER/val/<class>/*.jpg). DIR receives, in the layout of TF's ImageNet tooling:

    train-00000-of-01024 ...       training examples, in a seeded random order (so every shard mixes
                                   all classes and workers reading different shards see the same mix)
    validation-00000-of-00128 ...  the val split, in file order
    class_names.json               label order (index = label - label_offset)
    tfrecord_info.json             records per shard (the trainer needs no counting pass)

Each record is a tf.train.Example with `image/encoded` (the file's bytes, not re-encoded),
`image/class/label` (label + --label_offset; 1 as TF's tooling), `image/class/text` (class name),
`image/format` and `image/filename`. Each shard is written to `NAME.tmp` and renamed when complete, so
an interrupted conversion never leaves a half shard under a final name; rerunning the same command
skips finished shards and writes the rest.
"""
from __future__ import annotations

import json
import os
import sys
import time
import types

from absl import flags

from convmixer_dist import flags as cli
from convmixer_dist.errors import UsageError

CLASS_NAMES_FILE = "class_names.json"
INFO_FILE = "tfrecord_info.json"


def shard_name(prefix: str, index: int, count: int) -> str:
    """TF's ImageNet tooling names: train-00012-of-01024."""
    return f"{prefix}-{index:05d}-of-{count:05d}"


def plan_shards(paths: list[str], labels: list[int], shards: int, shuffle_seed: int | None
                ) -> list[list[tuple[str, int]]]:
    """Split (path, label) pairs into `shards` contiguous, near-equal parts, after a seeded shuffle
    when `shuffle_seed` is given (a pure function of the inputs: reruns plan the same shards)."""
    import numpy as np

    pairs = list(zip(paths, labels))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(pairs))
        pairs = [pairs[i] for i in order]
    bounds = [len(pairs) * i // shards for i in range(shards + 1)]
    return [pairs[bounds[i]:bounds[i + 1]] for i in range(shards)]


def make_example(path: str, label: int, class_name: str, label_offset: int):
    """The tf.train.Example of one image file (its bytes as they are)."""
    import tensorflow as tf

    with open(path, "rb") as f:
        data = f.read()
    fmt = b"JPEG" if data[:3] == b"\xff\xd8\xff" else b"PNG" if data[:4] == b"\x89PNG" else b"other"
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label + label_offset])),
        "image/class/text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[class_name.encode()])),
        "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[fmt])),
        "image/filename": tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[os.path.basename(path).encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def write_shard(path: str, examples: list[tuple[str, int]], class_names: list[str], label_offset: int,
                progress) -> None:
    """Write one shard atomically: PATH.tmp, then rename."""
    import tensorflow as tf

    tmp = path + ".tmp"
    with tf.io.TFRecordWriter(tmp) as writer:
        for file_path, label in examples:
            writer.write(make_example(file_path, label, class_names[label], label_offset).SerializeToString())
            progress(1)
    os.replace(tmp, path)


class Progress:
    """A one-line progress bar on stderr: images done, rate, ETA."""

    def __init__(self, total: int, out=sys.stderr):
        self.total, self.done, self.out, self.start = total, 0, out, time.time()

    def __call__(self, count: int) -> None:
        self.done += count
        if self.done % 200 and self.done != self.total:
            return
        elapsed = max(time.time() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / max(rate, 1e-9)
        filled = int(30 * self.done / max(self.total, 1))
        self.out.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} images "
                       f"{rate:,.0f}/s ETA {eta:,.0f}s")
        self.out.flush()


def convert(data_dir: str, output: str, shards: int, eval_shards: int, label_offset: int = 1,
            seed: int = 0, out=sys.stderr) -> dict:
    """Convert IMAGE_FOLDER into DIR (see the module docstring); returns the info written."""
    from convmixer_dist import rundir
    from convmixer_dist.data import image_folder

    splits, class_names = image_folder.list_image_folder_splits(data_dir)
    for flag, count, split in (("--shards", shards, "train"), ("--eval_shards", eval_shards, "val")):
        if count > len(splits[split][0]):
            raise UsageError(f"{flag}={count}: more shards than the {len(splits[split][0])} {split} images")
    rundir.ensure_writable_dir(output, f"--output={output}")
    plans = {"train": plan_shards(*splits["train"], shards, shuffle_seed=seed),
             "validation": plan_shards(*splits["val"], eval_shards, shuffle_seed=None)}
    names = {prefix: [shard_name(prefix, i, len(plan)) for i in range(len(plan))]
             for prefix, plan in plans.items()}
    todo = [(prefix, name, part) for prefix in plans for name, part in zip(names[prefix], plans[prefix])
            if not os.path.exists(os.path.join(output, name))]
    skipped = shards + eval_shards - len(todo)
    progress = Progress(sum(len(part) for _, _, part in todo), out)
    if skipped:
        out.write(f"{skipped} finished shards kept (rerun), {len(todo)} to write\n")
    for _, name, part in todo:
        write_shard(os.path.join(output, name), part, class_names, label_offset, progress)
    if todo:
        out.write("\n")
    rundir.write_text(os.path.join(output, CLASS_NAMES_FILE), json.dumps(class_names, indent=1) + "\n")
    info = {"shards": {name: len(part) for prefix in plans for name, part in zip(names[prefix], plans[prefix])},
            "label_offset": label_offset, "num_classes": len(class_names), "source": os.path.abspath(data_dir)}
    rundir.write_json(os.path.join(output, INFO_FILE), info)
    out.write(f"wrote {output}: {len(splits['train'][0])} train images in {shards} shards, "
              f"{len(splits['val'][0])} validation images in {eval_shards} shards, "
              f"{len(class_names)} classes\n")
    return info


def define_flags() -> None:
    flags.DEFINE_string("data_dir", None, "Image-folder tree: DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg.")
    flags.DEFINE_string("output", None, "Directory for the train-*/validation-* shards.")
    flags.DEFINE_integer("shards", 1024, "Training shards (TF's ImageNet tooling: 1024).", lower_bound=1)
    flags.DEFINE_integer("eval_shards", 128, "Validation shards (TF's ImageNet tooling: 128).", lower_bound=1)
    flags.DEFINE_integer("label_offset", 1, "Stored label = class index + offset (TF's tooling: 1; "
                         "train with the same --tfrecord_label_offset).")
    flags.DEFINE_integer("seed", 0, "Seed of the training examples' order across shards.", lower_bound=0)


def main(args: list[str], f: types.SimpleNamespace) -> None:
    if args:
        raise UsageError(f"unexpected arguments {args}; usage: --data_dir=IMAGE_FOLDER --output=DIR "
                         "--shards=N")
    if not f.data_dir:
        raise UsageError("--data_dir is required: the image-folder tree to convert")
    if not f.output:
        raise UsageError("--output is required: the directory for the TFRecord shards")
    from convmixer_dist.runtime import quiet_tensorflow_import

    quiet_tensorflow_import()
    convert(f.data_dir, f.output, f.shards, f.eval_shards, f.label_offset, f.seed)


if __name__ == "__main__":
    cli.run_command(main, define_flags)
