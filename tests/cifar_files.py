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
