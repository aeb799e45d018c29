"""`--dataset=image_folder --data_dir=DIR`: class-per-subfolder image trees (ImageNet's layout).

    DIR/train/<class>/*.jpg|jpeg|png
    DIR/val/<class>/*.jpg|jpeg|png

Classes are the sorted subfolder names of DIR/train (label i = i-th name, as torchvision's
ImageFolder); DIR/val must have the same class folders. Everything a user can get wrong (missing
directory or split, empty class folder, no images, mismatched classes, a file that is not an image)
is a one-line `UsageError` naming the flag and the path.

Corrupt files. Three layers, cheapest first:
  1. `list_image_folder(..., check_files=True)` reads the first 8 and the last 1024 bytes of every
     file (threads) and rejects anything that is not a JPEG/PNG/GIF/BMP signature (empty files, HTML
     error pages saved as .jpg) or lacks its format's end marker (partial downloads). It fails in seconds, before training starts, instead of
     hours later when the pipeline reaches the file (~50-70 us/file locally; pass check_files=False for
     huge remote trees).
  2. The pipeline repeats that signature check with `tf.debugging.Assert` carrying the path, so a file
     replaced after listing still fails with its name in the error.
  3. A file with a valid signature but a broken body (truncated JPEG, PNG CRC error) can only be found
     by decoding it; TensorFlow's decode error does not name the file. `reporting_corrupt_files(paths)`
     wraps the loop consuming the dataset and turns such an error into a UsageError naming the file(s),
     found by re-decoding with `ignore_errors` (only paid on the error path).

The training pipeline (pipeline.py) reads and shards the file list itself and calls `decode_and_resize`
(evaluation) or `decode_train_crop` (training) per example.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import tensorflow as tf

from convmixer_dist.data import image_decode
from convmixer_dist.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val")
CLASS_NAMES_FILE = "class_names.json"
_CORRUPT_MARKER = "corrupt image file:"
# Leading bytes of the formats tf.io.decode_image reads (a .jpg holding PNG bytes decodes fine).
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _has_image_signature(head: bytes) -> bool:
    return any(head.startswith(sig) for sig in _SIGNATURES)


_TAIL_BYTES = 1024


def _is_truncated(head: bytes, tail: bytes, size: int) -> bool:
    """True when a file's end shows it was cut short: a PNG without its IEND chunk, a JPEG without
    an end-of-image marker near its end, a GIF without its trailer, a BMP shorter than its header
    says. (Only an end marker in the last kilobyte is required: some writers pad after it.)"""
    if head.startswith(b"\x89PNG"):
        return b"IEND\xaeB`\x82" not in tail
    if head.startswith(b"\xff\xd8\xff"):
        return b"\xff\xd9" not in tail
    if head.startswith(b"GIF"):
        return not tail.rstrip(b"\x00").endswith(b"\x3b")
    if head.startswith(b"BM"):
        return len(head) >= 6 and int.from_bytes(head[2:6], "little") > size
    return False


def _is_special(mode: int) -> bool:
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def check_image_files(paths: Sequence[str], num_threads: int = 16) -> None:
    """Raise UsageError naming the first file whose leading bytes are not an image signature, or
    whose last bytes show a truncated file (a partial download), before anything is written."""
    def ends(path: str) -> tuple[bytes, bytes, int]:
        opener = tf.io.gfile.GFile if "://" in path else open  # local files: plain open is ~5x faster
        try:
            if "://" not in path and _is_special(os.stat(path).st_mode):
                return None, "a FIFO, socket or device", 0  # It would block the reader (and Ctrl-C) forever.
            with opener(path, "rb") as f:
                head = f.read(8)
                size = f.seek(0, 2)
                f.seek(max(0, size - _TAIL_BYTES))
                return head, f.read(), size
        except (OSError, tf.errors.OpError) as err:  # A directory named x.png, a dangling link.
            return None, getattr(err, "strerror", None) or err.__class__.__name__, 0

    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for path, (data, tail, size) in zip(paths, pool.map(ends, paths)):
            if data is None:
                raise UsageError(f"--data_dir: {path} is not a readable image file ({tail}); "
                                 "remove or rename it")
            if not _has_image_signature(data):
                raise UsageError(f"--data_dir: corrupt image file {path}: "
                                 f"{'empty file' if not data else 'not a JPEG/PNG/GIF/BMP file'}")
            if _is_truncated(data, tail, size):
                raise UsageError(f"--data_dir: corrupt image file {path}: truncated ({size} bytes, "
                                 "no end-of-image marker); re-download or remove it")


def list_image_folder(root: str, class_names: Sequence[str] | None = None,
                      check_files: bool = True) -> tuple[list[str], list[int], list[str]]:
    """List one split directory `root/<class>/<image>`: (paths, labels, class_names), sorted.

    With `class_names` (from the train split) the class folders must be exactly those and the labels
    follow that order. Raises UsageError for a missing directory, no class folders, an empty class
    folder, or (check_files) a file that is not an image.
    """
    if not tf.io.gfile.isdir(root):
        raise UsageError(f"--data_dir: directory {root} does not exist "
                         f"(expected {root}/<class>/*.jpg|jpeg|png)")
    found = sorted(name.rstrip("/") for name in tf.io.gfile.listdir(root)
                   if not name.startswith(".") and tf.io.gfile.isdir(os.path.join(root, name)))
    if not found:
        raise UsageError(f"--data_dir: {root} has no class subfolders (expected {root}/<class>/*.jpg)")
    if class_names is not None and found != list(class_names):
        missing = sorted(set(class_names) - set(found))
        extra = sorted(set(found) - set(class_names))
        raise UsageError(f"--data_dir: class folders of {root} do not match the train split "
                         f"(missing: {missing[:5]}, unexpected: {extra[:5]})")
    paths, labels = [], []
    for label, name in enumerate(found):
        folder = os.path.join(root, name)
        files = sorted(f for f in tf.io.gfile.listdir(folder) if _is_image_name(f))
        if not files:
            raise UsageError(f"--data_dir: class folder {folder} has no {'/'.join(IMAGE_EXTENSIONS)} images")
        paths.extend(os.path.join(folder, f) for f in files)
        labels.extend([label] * len(files))
    if check_files:
        check_image_files(paths)
    return paths, labels, found


def list_image_folder_splits(data_dir: str, check_files: bool = True
                             ) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
    """Both splits of DIR: ({"train": (paths, labels), "val": (paths, labels)}, class_names)."""
    if not data_dir or not tf.io.gfile.isdir(data_dir):
        raise UsageError(f"--data_dir={data_dir!r}: not a directory "
                         f"(expected DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg)")
    for split in SPLITS:
        if not tf.io.gfile.isdir(os.path.join(data_dir, split)):
            raise UsageError(f"--data_dir={data_dir}: missing the '{split}' split "
                             f"(expected {os.path.join(data_dir, split)}/<class>/*.jpg)")
    train_paths, train_labels, class_names = list_image_folder(os.path.join(data_dir, "train"),
                                                               check_files=check_files)
    val_paths, val_labels, _ = list_image_folder(os.path.join(data_dir, "val"), class_names,
                                                 check_files=check_files)
    return {"train": (train_paths, train_labels), "val": (val_paths, val_labels)}, class_names


def read_checked(path: tf.Tensor) -> tf.Tensor:
    """The file's bytes, after checking its image signature in the pipeline (the error names the file)."""
    data = tf.io.read_file(path)
    head = tf.strings.substr(data, 0, 8)
    signature_ok = tf.reduce_any(tf.stack([tf.equal(tf.strings.substr(head, 0, len(sig)), sig)
                                           for sig in _SIGNATURES]))
    with tf.control_dependencies([tf.debugging.Assert(signature_ok, [_CORRUPT_MARKER, path])]):
        return tf.identity(data)


def decode_and_resize(path: tf.Tensor, image_size: int, crop_fraction: float = 1.0) -> tf.Tensor:
    """Read, check the signature, decode to 3 channels, then timm's evaluation transform: shorter side
    to image_size / crop_fraction (bicubic), central image_size crop; uint8 HxWx3."""
    return image_decode.center_crop(image_decode.decode_full(read_checked(path)), image_size,
                                    crop_fraction)


def decode_train_crop(path: tf.Tensor, seed, image_size: int, scale: Sequence[float],
                      ratio: Sequence[float], decode_crop: bool = True) -> tf.Tensor:
    """Read, check the signature, and decode the random-resized training crop of the original image
    (only the crop window of a JPEG with `decode_crop`); uint8 image_size x image_size x 3."""
    return image_decode.decode_random_crop(read_checked(path), seed, image_size, scale, ratio,
                                           decode_crop)


def find_undecodable(paths: Sequence[str]) -> list[str]:
    """The files tf.io.decode_image rejects (decodes every file once; for the error path)."""
    indices = tf.data.Dataset.range(len(paths))
    path_table = tf.constant(list(paths), tf.string)
    decoded = indices.map(lambda i: (i, tf.shape(tf.io.decode_image(tf.io.read_file(path_table[i]),
                                                                     channels=3, expand_animations=False))),
                          num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    ok = {int(i) for i, _ in decoded.as_numpy_iterator()}
    return [p for i, p in enumerate(paths) if i not in ok]


@contextlib.contextmanager
def reporting_corrupt_files(paths: Sequence[str]) -> Iterator[None]:
    """Wrap the loop consuming an image-folder pipeline: a decode failure becomes a UsageError
    naming the file (from the pipeline's signature check, else by re-decoding `paths`)."""
    try:
        yield
    except tf.errors.InvalidArgumentError as err:
        message = str(err)
        named = re.search(re.escape(_CORRUPT_MARKER) + r"\]?\s*\[?(?:b')?([^'\]\n]+)", message)
        if named:
            raise UsageError(f"--data_dir: corrupt image file {named.group(1)}: "
                             "not a JPEG/PNG/GIF/BMP file") from None
        if not re.search(r"decode|JPEG|PNG|image", message, re.IGNORECASE):
            raise
        bad = find_undecodable(paths)
        if not bad:
            raise
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        reason = re.split(r"Iterator::\S+: ", getattr(err, "message", message).splitlines()[0])[-1]
        raise UsageError(f"--data_dir: corrupt image file {bad[0]}{more}: "
                         f"cannot be decoded ({reason[:120]})") from None


def save_class_names(model_dir: str, class_names: Sequence[str]) -> str:
    """Write `model_dir/class_names.json` (a JSON list, index = label); return its path."""
    tf.io.gfile.makedirs(model_dir)
    path = os.path.join(model_dir, CLASS_NAMES_FILE)
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(list(class_names), f, indent=1)
    return path


def load_class_names(model_dir: str) -> list[str] | None:
    """The list saved by `save_class_names`, or None if there is none."""
    path = os.path.join(model_dir, CLASS_NAMES_FILE)
    if not tf.io.gfile.exists(path):
        return None
    return read_class_names(path)


def read_class_names(path: str, num_classes: int | None = None) -> list[str]:
    """The JSON list of class names at `path`; one-line UsageError if it is not one (or, given
    `num_classes`, has another length), so a damaged file never ends in a traceback."""
    try:
        with tf.io.gfile.GFile(path) as f:
            names = json.load(f)
    except (ValueError, UnicodeDecodeError, tf.errors.OpError) as err:
        raise UsageError(f"{path}: not a readable JSON list of class names "
                         f"({err.__class__.__name__}); re-export or re-train to rewrite it") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"{path}: expected a JSON list of class-name strings")
    if num_classes is not None and len(names) != num_classes:
        raise UsageError(f"{path}: {len(names)} names for a model of {num_classes} classes")
    return names
