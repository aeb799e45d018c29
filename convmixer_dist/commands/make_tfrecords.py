"""Convert an image-folder tree into sharded TFRecords for `--dataset=tfrecord`, under a plan.

    python -m convmixer_dist.commands.make_tfrecords --data_dir=IMAGE_FOLDER --output=DIR --shards=1024 \
        [--eval_shards=128] [--label_offset=1] [--seed=0] [--overwrite]

IMAGE_FOLDER is the `--dataset=image_folder` layout (IMAGE_FOLDER/train/<class>/*.jpg and
IMAGE_FOLDER/val/<class>/*.jpg). DIR receives, in the layout of TF's ImageNet tooling:

    tfrecord_info.json             the manifest: the plan, then every finished shard (written first)
    class_names.json               label order (index = label - label_offset)
    train-00000-of-01024 ...       training examples, in a seeded random order (so every shard mixes
                                   all classes and workers reading different shards see the same mix)
    validation-00000-of-00128 ...  the val split, in file order

The plan is everything that decides what a shard holds: the class list, the label offset, the shard
counts, the seed and a hash of the sorted file list (split, path, label, size). The manifest is
written before any shard and names the plan by its hash (`plan_id`). A shard is written to
a hidden temporary beside it, renamed when complete, and only then entered in the manifest with its record count, size
and sha256: a shard is finished when the manifest lists it with a matching size and checksum, never
because a file of its name exists. A rerun under the same plan keeps the finished shards and writes
the rest; under another plan (a class folder added, another --label_offset, --shards or --seed) it
refuses in one line, and `--overwrite` rewrites everything. The output may not lie inside the input
tree. `"complete": true` in the manifest marks a finished conversion; training refuses an
unfinished one.

Each record is a tf.train.Example with `image/encoded` (the file's bytes, not re-encoded),
`image/class/label` (label + --label_offset; 1 as TF's tooling), `image/class/text` (class name),
`image/format` and `image/filename`.
"""
from __future__ import annotations

import hashlib
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
SHARD_PREFIXES = ("train-", "validation-")


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


def files_digest(data_dir: str, splits: dict) -> str:
    """sha256 of the sorted file list: one line per image (split, path under DATA_DIR, label, size)."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        for path, label in sorted(zip(*splits[split])):
            size = os.stat(path).st_size
            digest.update(f"{split}\t{os.path.relpath(path, data_dir)}\t{label}\t{size}\n".encode())
    return digest.hexdigest()


def make_plan(data_dir: str, splits: dict, class_names: list[str], shards: int, eval_shards: int,
              label_offset: int, seed: int) -> dict:
    """What decides every shard's content, and its id (the hash of the rest)."""
    plan = {"class_names": list(class_names), "label_offset": label_offset, "shards": shards,
            "eval_shards": eval_shards, "seed": seed, "train_images": len(splits["train"][0]),
            "validation_images": len(splits["val"][0]), "files_sha256": files_digest(data_dir, splits)}
    plan["plan_id"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    return plan


def plan_differences(old: dict, new: dict) -> list[str]:
    """What changed between two plans, in words ("label_offset 1 -> 0")."""
    changed = []
    for key in ("class_names", "label_offset", "shards", "eval_shards", "seed", "train_images",
                "validation_images", "files_sha256"):
        if old.get(key) != new.get(key):
            if key == "class_names":
                added = sorted(set(new[key]) - set(old.get(key) or []))
                removed = sorted(set(old.get(key) or []) - set(new[key]))
                changed.append(f"classes added {added[:5]} removed {removed[:5]}" if added or removed
                               else "class order")
            elif key == "files_sha256":
                changed.append("the image files")
            else:
                changed.append(f"{key} {old.get(key)} -> {new.get(key)}")
    return changed


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


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: str, examples: list[tuple[str, int]], class_names: list[str], label_offset: int,
                progress) -> dict:
    """Write one shard atomically (`rundir.atomic_output`: a hidden temporary beside it, fsynced,
    then renamed); returns its manifest entry (records, bytes, sha256)."""
    import tensorflow as tf

    from convmixer_dist import rundir

    with rundir.atomic_output(path) as tmp:
        with tf.io.TFRecordWriter(tmp) as writer:
            for file_path, label in examples:
                writer.write(make_example(file_path, label, class_names[label], label_offset).SerializeToString())
                progress(1)
    return {"records": len(examples), "bytes": os.path.getsize(path), "sha256": file_sha256(path)}


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


def shard_files(output: str) -> list[str]:
    """Names of the shard files and of temporary shards (NAME.tmp, .NAME.XXXXXX.tmp) in OUTPUT."""
    if not os.path.isdir(output):
        return []
    return sorted(n for n in os.listdir(output) if n.lstrip(".").startswith(SHARD_PREFIXES))


def _refuse_output_inside_input(data_dir: str, output: str) -> None:
    source, target = os.path.realpath(data_dir), os.path.realpath(output)
    if target == source or target.startswith(source.rstrip(os.sep) + os.sep):
        raise UsageError(f"--output={output} is inside --data_dir={data_dir}: the shards would become "
                         "part of the tree being converted (a class folder); pick a directory outside it")


def _read_manifest(output: str) -> dict | None:
    path = os.path.join(output, INFO_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise UsageError(f"--output={output}: {path} is unreadable ({err.__class__.__name__}); "
                         "pass --overwrite to rewrite the conversion") from None
    return manifest


def _check_same_plan(output: str, manifest: dict | None, plan: dict) -> dict:
    """The finished-shard entries to trust under `plan`; UsageError when OUTPUT holds another plan's
    shards (or shards of no known plan)."""
    existing = [n for n in shard_files(output) if not n.endswith(".tmp")]  # .tmp: an interrupted write
    if manifest is None or not isinstance(manifest.get("plan"), dict):
        if existing or manifest is not None:
            raise UsageError(f"--output={output} holds TFRecord shards ({existing[0] if existing else INFO_FILE}) "
                             "of a conversion without a plan (another tool or an older version); pass "
                             "--overwrite to rewrite everything, or pick another --output")
        return {}
    old = manifest["plan"]
    if old.get("plan_id") != plan["plan_id"]:
        changes = plan_differences(old, plan) or ["plan id"]
        raise UsageError(f"--output={output} holds a conversion under another plan ({', '.join(changes)}); "
                         "rerun with the same tree and flags to finish it, pass --overwrite to rewrite "
                         "everything, or pick another --output")
    planned = set(plan_names(plan))
    foreign = [n for n in existing if n not in planned]
    if foreign:
        raise UsageError(f"--output={output}: {foreign[0]} is not a shard of this conversion's plan; "
                         "remove it or pass --overwrite")
    shards = manifest.get("shards")
    return shards if isinstance(shards, dict) else {}


def plan_names(plan: dict) -> list[str]:
    return ([shard_name("train", i, plan["shards"]) for i in range(plan["shards"])] +
            [shard_name("validation", i, plan["eval_shards"]) for i in range(plan["eval_shards"])])


def _is_finished(output: str, name: str, entry) -> bool:
    """Listed with its record count, and the file on disk has the listed size and checksum."""
    path = os.path.join(output, name)
    return (isinstance(entry, dict) and isinstance(entry.get("records"), int) and os.path.isfile(path)
            and os.path.getsize(path) == entry.get("bytes") and file_sha256(path) == entry.get("sha256"))


def _clear(output: str) -> None:
    """--overwrite: remove every shard, temporary shard and the manifest (nothing else in OUTPUT)."""
    for name in shard_files(output) + [INFO_FILE, CLASS_NAMES_FILE]:
        path = os.path.join(output, name)
        if os.path.isfile(path) or os.path.islink(path):
            os.remove(path)


def convert(data_dir: str, output: str, shards: int, eval_shards: int, label_offset: int = 1,
            seed: int = 0, out=sys.stderr, overwrite: bool = False) -> dict:
    """Convert IMAGE_FOLDER into DIR (see the module docstring); returns the manifest written."""
    from convmixer_dist import rundir
    from convmixer_dist.data import image_folder

    _refuse_output_inside_input(data_dir, output)
    splits, class_names = image_folder.list_image_folder_splits(data_dir)
    for flag, count, split in (("--shards", shards, "train"), ("--eval_shards", eval_shards, "val")):
        if count > len(splits[split][0]):
            raise UsageError(f"{flag}={count}: more shards than the {len(splits[split][0])} {split} images")
    plan = make_plan(data_dir, splits, class_names, shards, eval_shards, label_offset, seed)
    rundir.ensure_writable_dir(output, f"--output={output}")
    if overwrite:
        _clear(output)
    listed = _check_same_plan(output, _read_manifest(output), plan)
    for name in shard_files(output):
        if name.endswith(".tmp"):
            os.remove(os.path.join(output, name))  # An interrupted write of this plan.
    parts = (plan_shards(*splits["train"], shards, shuffle_seed=seed)
             + plan_shards(*splits["val"], eval_shards, shuffle_seed=None))
    names = plan_names(plan)
    manifest = {"plan": plan, "plan_id": plan["plan_id"], "label_offset": label_offset,
                "num_classes": len(class_names), "source": os.path.abspath(data_dir), "complete": False,
                "shards": {n: listed[n] for n in names if n in listed and _is_finished(output, n, listed[n])}}
    rundir.write_json(os.path.join(output, INFO_FILE), manifest)  # The plan, before any shard.
    rundir.write_text(os.path.join(output, CLASS_NAMES_FILE), json.dumps(class_names, indent=1) + "\n")
    todo = [(name, part) for name, part in zip(names, parts) if name not in manifest["shards"]]
    progress = Progress(sum(len(part) for _, part in todo), out)
    if len(todo) < len(names):
        out.write(f"{len(names) - len(todo)} finished shards of plan {plan['plan_id']} kept (rerun), "
                  f"{len(todo)} to write\n")
    for name, part in todo:
        manifest["shards"][name] = write_shard(os.path.join(output, name), part, class_names,
                                               label_offset, progress)
        rundir.write_json(os.path.join(output, INFO_FILE), manifest)  # Finished only once listed.
    if todo:
        out.write("\n")
    manifest["complete"] = True
    rundir.write_json(os.path.join(output, INFO_FILE), manifest)
    out.write(f"wrote {output}: {len(splits['train'][0])} train images in {shards} shards, "
              f"{len(splits['val'][0])} validation images in {eval_shards} shards, "
              f"{len(class_names)} classes (plan {plan['plan_id']})\n")
    return manifest


def define_flags() -> None:
    flags.DEFINE_string("data_dir", None, "Image-folder tree: DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg.")
    flags.DEFINE_string("output", None, "Directory for the train-*/validation-* shards (not inside --data_dir).")
    flags.DEFINE_integer("shards", 1024, "Training shards (TF's ImageNet tooling: 1024).", lower_bound=1)
    flags.DEFINE_integer("eval_shards", 128, "Validation shards (TF's ImageNet tooling: 128).", lower_bound=1)
    flags.DEFINE_integer("label_offset", 1, "Stored label = class index + offset (TF's tooling: 1; "
                         "train with the same --tfrecord_label_offset).")
    flags.DEFINE_integer("seed", 0, "Seed of the training examples' order across shards.", lower_bound=0)
    flags.DEFINE_boolean("overwrite", False, "Remove the shards and manifest in --output and convert "
                         "everything again (a rerun otherwise continues only under the same plan).")


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
    convert(f.data_dir, f.output, f.shards, f.eval_shards, f.label_offset, f.seed, overwrite=f.overwrite)


if __name__ == "__main__":
    cli.run_command(main, define_flags)
