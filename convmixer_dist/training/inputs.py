"""The datasets of a run, loaded and checked before anything is written: the source's data, sizes,
the validation split, the evaluation streams and the training stream from a given step."""
from __future__ import annotations

import dataclasses

import numpy as np

from convmixer_dist.data import pipeline as data, registry
from convmixer_dist.data.source import Loaded
from convmixer_dist.config import Config, Derived, derive


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The loaded data, sizes and the splits."""

    config: Config
    strategy: object
    loaded: Loaded
    derived: Derived
    train_ids: np.ndarray | None  # With --validation_fraction: the training examples kept.
    eval_dataset: object  # The test split, evaluated at the end (and each epoch without validation).
    val_dataset: object | None  # The held-out validation split, evaluated each epoch.

    def train_batches(self, step: int):
        """An iterator over the training stream from global step `step` (exact on resume)."""
        return iter(data.train_dataset(self.strategy, self.config, self.derived, self.loaded, step,
                                       ids=self.train_ids))

    def class_names(self) -> tuple | None:
        """Names to save with the run (image folders, TFRecords with class_names.json), or None."""
        return self.loaded.class_names

    def reporting_errors(self):
        """A bad file met mid-run (a corrupt image or record) becomes one line naming it."""
        return registry.source(self.config).reporting_errors(self.config, self.loaded)


def prepare_inputs(config: Config, strategy) -> Inputs:
    """Load and check the data, split off the validation set, derive the step counts."""
    loaded = data.load(config)
    full_train, eval_size = data.split_sizes(config, loaded)
    # --validation_fraction: a seeded held-out part of the training split, evaluated each epoch.
    split_ids = data.validation_split(config, full_train)
    train_ids, val_ids = split_ids if split_ids else (None, None)
    derived = derive(config, strategy.num_replicas_in_sync,
                     full_train if train_ids is None else len(train_ids), eval_size)
    data.augment_spec(config).validate()
    eval_dataset = data.eval_dataset(strategy, config, derived, loaded)
    val_dataset = (None if val_ids is None
                   else data.eval_dataset(strategy, config, derived, loaded, split="validation",
                                          ids=val_ids))
    return Inputs(config, strategy, loaded, derived, train_ids, eval_dataset, val_dataset)
