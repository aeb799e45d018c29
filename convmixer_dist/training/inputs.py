"""The datasets of a run (its plan's data, sizes and validation split): the evaluation streams and
the training stream from a given step."""
from __future__ import annotations

import dataclasses

import numpy as np

from convmixer_dist.data import pipeline as data, registry
from convmixer_dist.data.source import Loaded
from convmixer_dist.config import Config, Derived
from convmixer_dist.plan import Plan


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


def prepare_inputs(run_plan: Plan, strategy) -> Inputs:
    """The evaluation streams of the plan's data (the training stream: `Inputs.train_batches`)."""
    config, loaded, derived = run_plan.config, run_plan.loaded, run_plan.derived
    eval_dataset = data.eval_dataset(strategy, config, derived, loaded)
    val_dataset = (None if run_plan.val_ids is None
                   else data.eval_dataset(strategy, config, derived, loaded, split="validation",
                                          ids=run_plan.val_ids))
    return Inputs(config, strategy, loaded, derived, run_plan.train_ids, eval_dataset, val_dataset)
