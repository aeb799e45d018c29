"""The run plan: what a run derives from its `Config` and strategy, resolved once, before anything is
written, and read by training (training/loop.py) and the benchmark (perf/benchmark.py).

    plan(config, strategy) -> Plan: the data source's description and loaded data, sizes and steps
    (`Derived`), the validation hold-out, the device kind, precision policy and XLA, the periods of
    the loop (`Periods`), the profile window, the crop ratio as numbers and where augmentation runs.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from convmixer_dist.config import Config, Derived, derive, parse_crop_ratio
from convmixer_dist.data import pipeline as data, registry
from convmixer_dist.data.source import Description, Loaded
from convmixer_dist.precision import precision_choice, use_xla
from convmixer_dist.profiling import check_profile_window, parse_profile_steps
from convmixer_dist.strategy import device_kind, is_chief


@dataclasses.dataclass(frozen=True)
class Periods:
    """The loop's periodic actions, each period declared once (in optimizer steps); a multi-step
    call ends at the next one. The run's last step is an epoch end and a checkpoint."""

    total: int  # The run's steps.
    epoch: int  # Epoch end: evaluation, best checkpoint, early stopping (and a progress line).
    log: int  # Progress line and train summaries.
    checkpoint: int  # Periodic checkpoint.
    steps_per_loop: int  # The longest call.
    profile: tuple[int, int] | None = None  # Inside the window one step per call (one profiler marker each).

    @classmethod
    def of(cls, config: Config, derived: Derived, profile: tuple[int, int] | None) -> "Periods":
        log = config.log_every_steps
        if not log:  # About ten lines per epoch, at loop boundaries: logging never shortens a call.
            tenth = max(1, min(derived.steps_per_epoch, derived.total_steps) // 10)
            log = max(1, round(tenth / config.steps_per_loop)) * config.steps_per_loop
        return cls(derived.total_steps, derived.steps_per_epoch, log, config.checkpoint_every_steps,
                   config.steps_per_loop, profile)

    def epoch_end(self, step: int) -> bool:
        return step % self.epoch == 0 or step == self.total

    def log_due(self, step: int) -> bool:
        return step % self.log == 0 or self.epoch_end(step)

    def checkpoint_due(self, step: int) -> bool:
        return step % self.checkpoint == 0 or step == self.total

    def steps_in_next_call(self, step: int) -> int:
        """--steps_per_loop, cut at the next epoch end, progress line, checkpoint and profile step."""
        every = (self.epoch, self.log, self.checkpoint)
        ends = [self.total, *((step // period + 1) * period for period in every)]
        if self.profile is not None:
            start, end = self.profile
            ends += [start, step + 1 if start <= step < end else end]
        return min(e for e in [step + self.steps_per_loop, *ends] if e > step) - step


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run derives from its config and strategy."""

    config: Config
    description: Description
    loaded: Loaded
    derived: Derived
    train_ids: np.ndarray | None  # With --validation_fraction: the training examples kept ...
    val_ids: np.ndarray | None    # ... and those held out.
    device_kind: str
    policy: str  # The Keras dtype policy.
    xla: bool
    profile_window: tuple[int, int] | None  # The chief's --profile_steps (None on other workers).
    periods: Periods
    crop_ratio: tuple[float, float]
    augmentation: str  # Where the batch augmentations run: "none", "host" (tf.data) or "device".
    crops_per_example: bool  # The random-resized crop is cut from each decoded original.


def _augmentation(config: Config) -> str:
    if data.augment_spec(config).validate().is_identity:
        return "none"
    return "device" if config.augment_on_device else "host"


def plan(config: Config, strategy) -> Plan:
    """Resolve the run: load and check the data (one-line UsageError), split off the validation
    set, derive sizes and steps, pick precision and XLA for the strategy's devices, check the profile
    window (a warning line on the chief when it ends after the last step)."""
    kind = device_kind(strategy)
    loaded = data.load(config)
    full_train, eval_size = data.split_sizes(config, loaded)
    split_ids = data.validation_split(config, full_train)
    train_ids, val_ids = split_ids if split_ids else (None, None)
    derived = derive(config, strategy.num_replicas_in_sync,
                     full_train if train_ids is None else len(train_ids), eval_size)
    augmentation = _augmentation(config)
    profile = parse_profile_steps(config.profile_steps)
    warning = check_profile_window(profile, derived.total_steps)
    chief = is_chief(strategy)
    if warning and chief:
        print(warning, flush=True)
    policy, why = precision_choice(config.precision, kind, hidden_dim=config.hidden_dim)
    if config.precision == "auto" and chief:
        print(f"precision=auto -> {policy}: {why}", flush=True)
    profile = profile if chief else None
    return Plan(config, registry.describe(config), loaded, derived, train_ids, val_ids, kind,
                policy, use_xla(config, kind), profile,
                Periods.of(config, derived, profile), parse_crop_ratio(config.crop_ratio), augmentation,
                data.crops_per_example(config))
