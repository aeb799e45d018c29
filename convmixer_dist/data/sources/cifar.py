"""`--dataset=cifar10|cifar100`: CIFAR in the official python format (or keras.datasets' download).

The reader unpickles only what genuine CIFAR files contain (numpy arrays, bytes, numbers), so a file
never runs code. Examples are read by index; the pipeline streams them (`indexed.py`).
"""
from __future__ import annotations

import contextlib
import functools
import glob
import os
import pickle
import tarfile

import numpy as np

from convmixer_dist.config import Config
from convmixer_dist.data.source import Description, Loaded
from convmixer_dist.errors import UsageError

CIFAR10_MEAN = (125.307, 122.961, 113.8575)    # (0.4914, 0.4822, 0.4465) * 255
CIFAR10_STD = (63.0105, 62.0925, 66.7080)       # (0.2471, 0.2435, 0.2616) * 255
CIFAR100_MEAN = (129.3105, 124.1085, 112.404)   # (0.5071, 0.4867, 0.4408) * 255
CIFAR100_STD = (68.2125, 65.4075, 70.4055)      # (0.2675, 0.2565, 0.2761) * 255
TRAIN_SIZE, TEST_SIZE, IMAGE_SIZE = 50000, 10000, 32

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew",
    "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower",
    "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor", "train", "trout",
    "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm")
CLASS_NAMES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}
_STATISTICS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
_CIFAR_LAYOUT = {
    # dataset: (folder inside data_dir / archive, train file glob, test file name, label key)
    "cifar10": ("cifar-10-batches-py", "data_batch_*", "test_batch", b"labels"),
    "cifar100": ("cifar-100-python", "train", "test", b"fine_labels"),
}
_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


def _decode_batch(blob: dict, label_key: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One unpickled CIFAR file -> (N,32,32,3) uint8 images and (N,) int32 labels."""
    try:
        data = np.asarray(blob[b"data"], dtype=np.uint8)
        labels = np.asarray(blob[label_key], dtype=np.int32)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except (KeyError, ValueError, TypeError) as err:
        raise UsageError(f"{source} is not a CIFAR python-format batch ({err.__class__.__name__})") from None
    if len(images) != len(labels):
        raise UsageError(f"{source} is corrupt: {len(images)} images but {len(labels)} labels")
    return images, labels


def _check_labels(labels: np.ndarray, dataset: str, source: str) -> None:
    """Labels outside 0..classes-1 (e.g. CIFAR-100 files under --dataset=cifar10) would train at
    accuracy 0 and crash at evaluation; refuse them before anything is written."""
    classes = len(CLASS_NAMES[dataset])
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise UsageError(f"{source}: labels {int(labels.min())}..{int(labels.max())} are outside "
                         f"0..{classes - 1} of --dataset={dataset}; is it the right dataset?")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes at protocol <= 2 (always latin1); no other codec."""
    if encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


@functools.cache
def _pickle_globals() -> dict[tuple[str, str], object]:
    """The only callables a CIFAR file may name: numpy's array reconstruction under the module
    names of numpy 1.x (`numpy.core`) and 2.x (`numpy._core`), and latin1 bytes (Python 3 writers)."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a callable that CIFAR files never contain."""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that admits only what genuine CIFAR-10/100 files contain: dicts, lists, bytes,
    str, numbers and numpy arrays. Anything else (a pickle can name any importable callable, e.g.
    `os.system`) is refused before it is looked up, so loading a file never runs code from it."""

    def find_class(self, module: str, name: str):
        target = _pickle_globals().get((module, name))
        if target is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return target


def _unpickle(fileobj, source: str) -> dict:
    # The only pickle loading in the project: the official CIFAR distribution format, restricted.
    try:
        return _CifarUnpickler(fileobj, encoding="bytes").load()
    except _RefusedGlobal as err:
        raise UsageError(f"{source} is not a CIFAR python-format file: it asks to call {err}, which "
                         "CIFAR files never contain; refused without running it") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt/foreign file
        raise UsageError(f"{source} is not a readable CIFAR python-format file "
                         f"({err.__class__.__name__})") from None


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_folder(folder: str, dataset: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    _, train_glob, test_name, label_key = _CIFAR_LAYOUT[dataset]
    train_files = sorted(glob.glob(os.path.join(folder, train_glob)))
    test_file = os.path.join(folder, test_name)
    if not train_files or not os.path.isfile(test_file):
        raise UsageError(f"--data_dir: {folder} lacks the {dataset} files ({train_glob} and {test_name})")
    splits = {}
    for split, files in (("train", train_files), ("test", [test_file])):
        parts = []
        for path in files:
            with open(path, "rb") as f:
                parts.append(_decode_batch(_unpickle(f, path), label_key, path))
            _check_labels(parts[-1][1], dataset, path)
        splits[split] = _concat(parts)
    return splits


def _read_archive(path: str, dataset: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder, train_glob, test_name, label_key = _CIFAR_LAYOUT[dataset]
    train_parts, test_parts = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
            for member in members:
                parent, name = os.path.split(member.name)
                if os.path.basename(parent) != folder:
                    continue
                if glob.fnmatch.fnmatch(name, train_glob):
                    target = train_parts
                elif name == test_name:
                    target = test_parts
                else:
                    continue
                source = f"{path}:{member.name}"
                target.append(_decode_batch(_unpickle(tar.extractfile(member), source), label_key, source))
                _check_labels(target[-1][1], dataset, source)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UsageError(f"--data_dir: {path} is not a readable .tar.gz ({err})") from None
    if not train_parts or not test_parts:
        raise UsageError(f"--data_dir: {path} lacks {folder}/{train_glob} or {folder}/{test_name}")
    return {"train": _concat(train_parts), "test": _concat(test_parts)}


def read_cifar(data_dir: str, dataset: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read CIFAR-10/100 in the official python format.

    `data_dir` may be the extracted folder (`cifar-10-batches-py`), its parent, the `.tar.gz` itself,
    or a folder holding the `.tar.gz`. Per-file sample counts are not assumed.
    Returns {"train": (images, labels), "test": (images, labels)} with uint8 NHWC images.
    """
    folder_name = _CIFAR_LAYOUT[dataset][0]
    if os.path.isfile(data_dir):
        return _read_archive(data_dir, dataset)
    for candidate in (data_dir, os.path.join(data_dir, folder_name)):
        if os.path.isfile(os.path.join(candidate, _CIFAR_LAYOUT[dataset][2])):
            return _read_folder(candidate, dataset)
    archive = os.path.join(data_dir, _ARCHIVES[dataset])
    if os.path.isfile(archive):
        return _read_archive(archive, dataset)
    raise UsageError(f"--data_dir={data_dir} holds neither {folder_name}/ nor {_ARCHIVES[dataset]} "
                     f"for --dataset={dataset}")


def _download(dataset: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """keras.datasets' copy (download + cache)."""
    import keras  # Imported here: only this path needs the downloader.

    loader = {"cifar10": keras.datasets.cifar10, "cifar100": keras.datasets.cifar100}[dataset]
    try:
        (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as err:  # noqa: BLE001 - any download/cache failure has the same remedy
        raise UsageError(f"could not download {dataset} ({err.__class__.__name__}); pass "
                         f"--data_dir with the python-format files, or use --dataset=synthetic") from None
    return {"train": (x_train, y_train.reshape(-1).astype(np.int32)),
            "test": (x_test, y_test.reshape(-1).astype(np.int32))}


# --------------------------------------------------------------------------- the source interface
def describe(config: Config) -> Description:
    mean, std = _STATISTICS[config.dataset]
    return Description(num_classes=len(CLASS_NAMES[config.dataset]), image_size=IMAGE_SIZE,
                       train_size=TRAIN_SIZE, eval_size=TEST_SIZE, mean=mean, std=std,
                       class_names=CLASS_NAMES[config.dataset], encoded=False)


def check(config: Config) -> None:
    """No rules of its own: any --data_dir layout is found by `read_cifar`, none means download."""


def load(config: Config) -> Loaded:
    """The arrays from --data_dir, or keras.datasets' download cache."""
    splits = read_cifar(config.data_dir, config.dataset) if config.data_dir else _download(config.dataset)
    return Loaded(len(splits["train"][0]), len(splits["test"][0]), None, splits)


def train_examples(config: Config, loaded: Loaded, ids, pipeline: int, pipelines: int, start_step: int):
    from convmixer_dist.data.sources import indexed

    example = indexed.array_example(*loaded.content["train"], config.image_size)
    size = loaded.train_size if ids is None else len(ids)
    return indexed.train_stream(config, size, ids, pipeline, pipelines, start_step,
                                lambda seed, index: example(index))


def eval_examples(config: Config, loaded: Loaded, split: str, ids, pipeline: int, pipelines: int):
    from convmixer_dist.data.sources import indexed

    images, labels = loaded.content["test" if split == "test" else "train"]
    size = len(labels) if ids is None else len(ids)
    return indexed.eval_stream(size, ids, pipeline, pipelines,
                               indexed.array_example(images, labels, config.image_size))


def reporting_errors(config: Config, loaded: Loaded):
    return contextlib.nullcontext()
