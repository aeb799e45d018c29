"""The datasets of a run, loaded and checked before anything is written: arrays, sizes, the
validation split, the evaluation streams and the training stream from a given step."""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from convmixer_dist.data import pipeline as data, image_folder, tfrecord
from convmixer_dist.config import Config, Derived, derive


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Loaded arrays (None for synthetic data), sizes and the splits."""

    config: Config
    strategy: object
    arrays: dict | None
    derived: Derived
    train_ids: np.ndarray | None  # With --validation_fraction: the training examples kept.
    eval_dataset: object  # The test split, evaluated at the end (and each epoch without validation).
    val_dataset: object | None  # The held-out validation split, evaluated each epoch.

    def train_batches(self, step: int):
        """An iterator over the training stream from global step `step` (exact on resume)."""
        return iter(data.train_dataset(self.strategy, self.config, self.derived, self.arrays, step,
                                       ids=self.train_ids))

    def class_names(self) -> list | None:
        return self.arrays.get("class_names") if self.arrays else None

    def reporting_errors(self):
        """A corrupt image surfaces as a decode error mid-run; name the file in one line."""
        config, arrays = self.config, self.arrays
        if config.dataset == "image_folder":
            return image_folder.reporting_corrupt_files(list(arrays["train"][0]) + list(arrays["test"][0]))
        if config.dataset == "tfrecord":
            return tfrecord.reporting_record_errors(config.data_dir, arrays["tfrecord"],
                                                    config.tfrecord_label_offset, config.num_classes)
        return contextlib.nullcontext()


def prepare_inputs(config: Config, strategy) -> Inputs:
    """Load and check the data, split off the validation set, derive the step counts."""
    arrays = None if config.dataset == "synthetic" else data.load_arrays(config)
    full_train, eval_size = data.split_sizes(config, arrays)
    # --validation_fraction: a seeded held-out part of the training split, evaluated each epoch.
    split_ids = data.validation_split(config, full_train)
    train_ids, val_ids = split_ids if split_ids else (None, None)
    derived = derive(config, strategy.num_replicas_in_sync,
                     full_train if train_ids is None else len(train_ids), eval_size)
    data.augment_spec(config).validate()
    eval_dataset = data.eval_dataset(strategy, config, derived, arrays)
    val_dataset = (None if val_ids is None
                   else data.eval_dataset(strategy, config, derived, arrays, split="validation",
                                          ids=val_ids))
    return Inputs(config, strategy, arrays, derived, train_ids, eval_dataset, val_dataset)
