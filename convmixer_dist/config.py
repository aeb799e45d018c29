"""The run configuration: one frozen dataclass built once from flags, plus the values derived from it.

Every field is a flag of the same name, so `to_flagfile` writes a valid absl flagfile that reproduces
the run (`MODEL_DIR/flags.txt`). Derived values (per-replica batch, steps per epoch, total steps) are
computed in one place, `derive`, once the strategy knows the number of replicas.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from convmixer_dist.errors import UsageError

STRATEGIES = ("one_device", "mirrored", "multi_worker")
DATASETS = ("cifar10", "cifar100", "synthetic", "image_folder", "tfrecord")
ERASE_MODES = ("const", "pixel")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
LR_SCHEDULES = ("onecycle", "cosine", "constant")
AUGMENTS = ("none", "basic", "rrc")
ALL_REDUCES = ("auto", "nccl", "hierarchical_copy", "ring")
CLUSTERS = ("auto", "tf_config", "slurm")
XLA_MODES = ("auto", "on", "off")
NAN_POLICIES = ("stop", "rollback")
# Flags a resumed run must share with the run that wrote the checkpoint (the checkpoint's shape and
# meaning depend on them). Others (epochs, strategy, batch size, ...) may change between restarts.
IDENTITY_FIELDS = ("model", "hidden_dim", "depth", "kernel_size", "patch_size", "activation",
                   "dataset", "num_classes", "image_size", "precision")

# Examples per split of the datasets with a fixed size (the synthetic size is a flag).
DATASET_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000)}
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100}
NATIVE_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32}


def parse_crop_ratio(text: str) -> tuple[float, float]:
    """--crop_ratio '0.75,1.3333' -> (0.75, 1.3333); ValueError unless 0 < LOW <= HIGH (finite)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2:
        raise ValueError(text)
    low, high = (float(p) for p in parts)
    if not (0 < low <= high and math.isfinite(high)):
        raise ValueError(text)
    return low, high


def flag_text(value) -> str:
    """A value as it appears after `--name=` in a flagfile."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def read_flagfile(path: str) -> dict[str, str]:
    """`--name=value` lines of a flagfile written by `Config.to_flagfile` (comments skipped)."""
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("--") and "=" in line:
                name, value = line[2:].split("=", 1)
                values[name] = value
    return values


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on. Fields mirror the flags one to one (see flags.py for help texts)."""

    # Distribution.
    strategy: str = "one_device"
    num_gpus: int = -1
    cpu_replicas: int = 1
    all_reduce: str = "auto"
    cluster: str = "auto"
    collective_timeout: float = 300.0
    # Model (resolved from --model plus overrides).
    model: str = "convmixer_256_8"
    hidden_dim: int = 256
    depth: int = 8
    kernel_size: int = 5
    patch_size: int = 2
    activation: str = "gelu"
    dropout_rate: float = 0.0
    sync_bn: bool = False
    # Data.
    dataset: str = "synthetic"
    data_dir: str = ""
    image_size: int = 32
    num_classes: int = 10
    synthetic_train_size: int = 10000
    synthetic_eval_size: int = 1000
    augment: str = "basic"
    crop_scale: float = 1.0
    crop_ratio: str = "1,1"
    randaug_n: int = 0
    randaug_m: float = 0.0
    randaug_mstd: float = 0.0
    jitter: float = 0.0
    erase_prob: float = 0.0
    erase_mode: str = "const"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    augment_on_device: bool = False
    decode_crop: bool = True
    eval_crop_fraction: float = 1.0
    tfrecord_label_offset: int = 1
    validation_fraction: float = 0.0
    early_stopping_patience: int = 0
    # Optimization.
    global_batch_size: int = 128
    epochs: int = 1
    train_steps: int = 0
    steps_per_loop: int = 10
    learning_rate: float = 0.01
    weight_decay: float = 0.01
    wd_exclude_bias_bn: bool = False
    grad_accum_steps: int = 1
    adam_epsilon: float = 1e-8
    lr_schedule: str = "onecycle"
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    clip_norm: float = 0.0
    precision: str = "auto"
    xla: str = "auto"
    # Output.
    model_dir: str = "runs/default"
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 3
    log_every_steps: int = 0
    profile_steps: str = ""
    profiler_port: int = 0
    profile_host_tracer_level: int = 2
    profile_python_tracer_level: int = 0
    seed: int = 0
    # Reliability.
    deterministic: bool = False
    nan_policy: str = "stop"
    nan_max_rollbacks: int = 3
    nan_lr_factor: float = 0.5
    # Actions and test hooks of this invocation only: never written to flags.txt.
    overwrite: bool = dataclasses.field(default=False, metadata={"flagfile": False})
    fault_inject_nan_at_step: int = dataclasses.field(default=0, metadata={"flagfile": False})

    def to_flagfile(self) -> str:
        """The config as an absl flagfile (one `--name=value` line per field)."""
        lines = ["# Resolved flags of this run; rerun with --flagfile=<this file>."]
        for field in dataclasses.fields(self):
            if not field.metadata.get("flagfile", True):
                continue
            lines.append(f"--{field.name}={flag_text(getattr(self, field.name))}")
        return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Derived:
    """Values computed from the config and the number of replicas."""

    num_replicas: int
    per_replica_batch_size: int  # examples per replica per micro-batch (global / replicas / accum)
    steps_per_epoch: int
    total_steps: int
    epochs: int
    train_size: int
    eval_size: int


def dataset_sizes(config: Config) -> tuple[int, int]:
    """(train, eval) example counts of the configured dataset."""
    if config.dataset == "synthetic":
        return config.synthetic_train_size, config.synthetic_eval_size
    return DATASET_SIZES[config.dataset]


def derive(config: Config, num_replicas: int, train_size: Optional[int] = None,
           eval_size: Optional[int] = None) -> Derived:
    """Per-replica batch, steps per epoch and total steps; `--train_steps` wins over `--epochs`."""
    divisor = num_replicas * config.grad_accum_steps  # each replica's micro-batch must be whole
    if config.global_batch_size % divisor:
        accum = f" x --grad_accum_steps={config.grad_accum_steps}" if config.grad_accum_steps > 1 else ""
        raise UsageError(
            f"--global_batch_size={config.global_batch_size} is not divisible by the "
            f"{num_replicas} replicas of --strategy={config.strategy}{accum}; use a multiple of {divisor}")
    default_train, default_eval = dataset_sizes(config) if config.dataset in DATASET_SIZES or \
        config.dataset == "synthetic" else (0, 0)
    train_size = default_train if train_size is None else train_size
    eval_size = default_eval if eval_size is None else eval_size
    steps_per_epoch = train_size // config.global_batch_size
    if steps_per_epoch < 1:
        raise UsageError(f"--global_batch_size={config.global_batch_size} is larger than the "
                         f"{train_size} training examples of --dataset={config.dataset}")
    if config.train_steps > 0:
        total_steps = config.train_steps
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        total_steps = steps_per_epoch * config.epochs
        epochs = config.epochs
    return Derived(num_replicas=num_replicas,
                   per_replica_batch_size=config.global_batch_size // divisor,
                   steps_per_epoch=steps_per_epoch, total_steps=total_steps, epochs=epochs,
                   train_size=train_size, eval_size=eval_size)
