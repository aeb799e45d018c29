"""Writers of small CIFAR files in the official python-pickle format (no dataset is shipped)."""
from __future__ import annotations

import os
import pickle
import tarfile

import numpy as np


def _batch(rng, n: int, num_classes: int, label_key: bytes) -> dict:
    return {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, num_classes, size=n).tolist(), b"batch_label": b"fake"}


def write_cifar10(root: str, train_sizes=(30, 17, 25, 9, 19), test_size=23, seed=0) -> str:
    """`root/cifar-10-batches-py/` with uneven data_batch_* files; returns that folder."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for i, n in enumerate(train_sizes, 1):
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump(_batch(rng, n, 10, b"labels"), f)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump(_batch(rng, test_size, 10, b"labels"), f)
    return folder


def write_cifar100(root: str, train_size=40, test_size=11, seed=0) -> str:
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for name, n in (("train", train_size), ("test", test_size)):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(_batch(rng, n, 100, b"fine_labels"), f)
    return folder


def tar_gz(folder: str, archive: str) -> str:
    """Pack `folder` (by its base name) into `archive` as the official download does."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=os.path.basename(folder))
    return archive


class _Python2Pickler(pickle._Pickler):  # noqa: SLF001 - the pure-Python pickler can be specialised
    """Writes bytes as Python 2 `str` (SHORT_BINSTRING/BINSTRING), as cPickle wrote the official
    CIFAR files, instead of Python 3's `_codecs.encode(..., 'latin1')`."""

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + n.to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)  # noqa: SLF001
    dispatch[bytes] = save_bytes


def pickle_styles(obj) -> dict[str, bytes]:
    """`obj` pickled the ways CIFAR files exist in the wild: Python 2 + numpy 1.x (the official
    files: `numpy.core.multiarray._reconstruct`), Python 3 + numpy 1.x (protocol 2), and numpy 2.x
    (`numpy._core...`) at protocols 2, 4 and 5 (protocol 5 arrays use `numpy._core.numeric._frombuffer`)."""
    import io

    def numpy1(blob: bytes) -> bytes:  # numpy 2 writes numpy._core; numpy 1 wrote numpy.core
        return blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")

    py2 = io.BytesIO()
    _Python2Pickler(py2, protocol=2).dump(obj)
    styles = {"python2_numpy1": numpy1(py2.getvalue()),
              "python3_numpy1": numpy1(pickle.dumps(obj, protocol=2))}
    for protocol in (2, 4, 5):
        styles[f"numpy2_protocol{protocol}"] = pickle.dumps(obj, protocol=protocol)
    return styles
