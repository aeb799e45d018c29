"""Learning-rate schedules, evaluated per optimizer step.

`onecycle` is the reference ConvMixer CIFAR schedule (locuslab/convmixer-cifar10):
`np.interp(t, [0, 2/5 T, 4/5 T, T], [0, max, max/20, 0])`, here with T in steps instead of epochs.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf


class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Piecewise-linear 0 -> max at 2/5 -> max/20 at 4/5 -> 0 over `total_steps`."""

    def __init__(self, max_lr: float, total_steps: int):
        self.max_lr = float(max_lr)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        t = tf.cast(step, tf.float32)
        total = float(self.total_steps)
        xs = [0.0, 0.4 * total, 0.8 * total, total]
        ys = [0.0, self.max_lr, self.max_lr / 20.0, 0.0]
        lr = tf.constant(0.0)
        for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
            frac = (t - x0) / max(x1 - x0, 1e-9)
            segment = y0 + (y1 - y0) * frac
            lr = tf.where((t >= x0) & (t < x1), segment, lr)
        return lr  # 0 at and beyond total_steps, as np.interp clamps to the last value (0).

    def get_config(self):
        return {"max_lr": self.max_lr, "total_steps": self.total_steps}


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `max_lr`, then cosine decay to 0 at `total_steps` (constant if `decay`=False)."""

    def __init__(self, max_lr: float, total_steps: int, warmup_steps: int = 0, decay: bool = True):
        self.max_lr, self.total_steps = float(max_lr), int(total_steps)
        self.warmup_steps, self.decay = int(warmup_steps), bool(decay)

    def __call__(self, step):
        t = tf.cast(step, tf.float32)
        warm = tf.minimum(1.0, (t + 1.0) / max(self.warmup_steps, 1)) if self.warmup_steps else 1.0
        if not self.decay:
            return self.max_lr * warm
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = tf.clip_by_value((t - self.warmup_steps) / span, 0.0, 1.0)
        return self.max_lr * warm * 0.5 * (1.0 + tf.cos(math.pi * progress))

    def get_config(self):
        return {"max_lr": self.max_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "decay": self.decay}


class Scaled(keras.optimizers.schedules.LearningRateSchedule):
    """`base(step) * scale`, where `scale` is a (checkpointed) variable lowered by NaN rollbacks."""

    def __init__(self, base, scale):
        self.base, self.scale = base, scale

    def __call__(self, step):
        return self.base(step) * tf.cast(self.scale, tf.float32)

    def get_config(self):
        return {"base": self.base.get_config()}


def create_schedule(name: str, max_lr: float, total_steps: int, warmup_steps: int = 0, scale=None):
    """The schedule named by `--lr_schedule`, optionally multiplied by the variable `scale`."""
    if name == "onecycle":
        base = OneCycle(max_lr, total_steps)
    else:
        base = WarmupCosine(max_lr, total_steps, warmup_steps, decay=(name == "cosine"))
    return base if scale is None else Scaled(base, scale)
