"""What a run reports: the line before training, progress and evaluation lines with their
TensorBoard summaries (chief only; no-op writers elsewhere), the throughput counters and summary.json."""
from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf

from convmixer_dist import optimization
from convmixer_dist.config import Config, Derived
from convmixer_dist.model import count_params


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def describe_run(config: Config, derived: Derived, model: keras.Model, policy: str, xla: bool) -> str:
    """The one-line description printed before training."""
    return (f"ConvMixer-{config.hidden_dim}/{config.depth} k{config.kernel_size} "
            f"p{config.patch_size}, {count_params(model):,} parameters; strategy={config.strategy} "
            f"replicas={derived.num_replicas} precision={policy} xla={'on' if xla else 'off'}; "
            f"{derived.total_steps} steps ({derived.epochs} epochs x {derived.steps_per_epoch}), "
            f"global batch {config.global_batch_size} ({derived.per_replica_batch_size}/replica)")


@dataclasses.dataclass
class Counters:
    """What the loop counts across epochs and NaN rollbacks (changed in place)."""

    nan_at_step: int = 0  # --fault_inject_nan_at_step until the injected fault has fired once.
    images: int = 0  # Images trained in timed calls (the first call of an attempt compiles) ...
    seconds: float = 0.0  # ... and their wall time: the run's images/s (summary.json).
    window_images: int = 0  # The same since the last progress line: TensorBoard's images_per_sec,
    window_seconds: float = 0.0  # so a slowdown shows instead of vanishing in the run's average.
    rollbacks: int = 0

    @property
    def images_per_sec(self) -> float | None:
        return self.images / self.seconds if self.seconds else None

    def add_timed(self, images: int, seconds: float) -> None:
        """Count one timed loop call in the run's and the window's rates."""
        self.images, self.seconds = self.images + images, self.seconds + seconds
        self.window_images, self.window_seconds = self.window_images + images, self.window_seconds + seconds

    def window_rate(self, fallback: float) -> float:
        """Images/s since the previous call (a new window starts); `fallback` (the last call's rate)
        when the window holds only an untimed call."""
        rate = self.window_images / self.window_seconds if self.window_seconds else fallback
        self.window_images, self.window_seconds = 0, 0.0
        return rate


class Report:
    """Lines (chief only) and the TensorBoard writers train/validation/test. Runs written before the
    test split's run was named `test` have it under `eval/`; `plot` reads both as one."""

    def __init__(self, config: Config, derived: Derived, chief: bool, validation: bool):
        self.config, self.derived, self.chief = config, derived, chief

        def writer(name: str, enabled: bool = True):
            if chief and enabled:
                return tf.summary.create_file_writer(os.path.join(config.model_dir, name))
            return tf.summary.create_noop_writer()
        self.writers = {"train": writer("train"), "test": writer("test"),
                        "validation": writer("validation", validation)}

    def say(self, text: str) -> None:
        if self.chief:
            print(text, flush=True)

    def train(self, step: int, epoch: int, window, lr: float, rate: float, optimizer) -> None:
        """A progress line and the train summaries over the steps since the last line."""
        config, derived = self.config, self.derived
        loss, acc = window[0] / max(window[2], 1), window[1] / max(window[2], 1)
        eta = (derived.total_steps - step) * config.global_batch_size / max(rate, 1e-9)
        self.say(f"epoch {epoch + 1}/{derived.epochs} step {step}/{derived.total_steps} "
                 f"loss {loss:.4f} acc {acc:.4f} lr {lr:.2e} {rate:,.0f} img/s ETA {format_eta(eta)}")
        with self.writers["train"].as_default(step=step):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("accuracy", acc)
            tf.summary.scalar("learning_rate", lr)
            tf.summary.scalar("images_per_sec", rate)
            tf.summary.scalar("step_time_ms", 1000.0 * config.global_batch_size / max(rate, 1e-9))
            scale = optimization.loss_scale_value(optimizer)
            if scale is not None:
                tf.summary.scalar("loss_scale", scale)

    def evaluation(self, step: int, epoch: int, metrics: dict, split: str) -> None:
        """A line and the `split` (validation or test) summaries."""
        self.say(f"epoch {epoch + 1}/{self.derived.epochs} {split} "
                 f"loss {metrics['loss']:.4f} acc {metrics['accuracy']:.4f} "
                 f"top5 {metrics['top5_accuracy']:.4f} ({metrics['examples']} examples)")
        with self.writers[split].as_default(step=step):
            for key in ("loss", "accuracy", "top5_accuracy"):
                tf.summary.scalar(key, metrics[key])

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()


def build_summary(config: Config, derived: Derived, eval_metrics: dict, epoch_totals, step: int,
                  counters: Counters, wall_seconds: float, policy: str, xla: bool, parameters: int,
                  resumed_from: str | None, learning_rate_scale: float, validation: dict,
                  fingerprint: dict) -> dict:
    """summary.json: test-split metrics (test_*, and eval_* as before), the last epoch's training
    loss/accuracy (restored across restarts), throughput and the run's setup."""
    loss_sum, correct, count = epoch_totals
    test = {"accuracy": eval_metrics["accuracy"], "loss": eval_metrics["loss"],
            "top5_accuracy": eval_metrics["top5_accuracy"], "examples": eval_metrics["examples"]}
    return {
        **{f"test_{key}": value for key, value in test.items()},
        # The same test-split numbers under their older names, for scripts written against them.
        **{f"eval_{key}": value for key, value in test.items()},
        "train_loss": loss_sum / count if count else None,
        "train_accuracy": correct / count if count else None,
        "steps": step, "epochs": derived.epochs, "steps_per_epoch": derived.steps_per_epoch,
        "images_per_sec": counters.images_per_sec, "wall_seconds": wall_seconds,
        "num_replicas": derived.num_replicas, "precision": policy, "xla": xla,
        "strategy": config.strategy, "model": config.model, "parameters": parameters,
        "global_batch_size": config.global_batch_size, "resumed_from": resumed_from,
        "nan_rollbacks": counters.rollbacks, "learning_rate_scale": learning_rate_scale,
        **validation,
        **fingerprint,
    }
