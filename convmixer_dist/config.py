"""The run configuration: every setting declared once, as a field of the frozen `Config`.

Each field carries its default, its help text and its checks (`setting(...)`); `flags.py` generates
one command-line flag per field from them, `Config.to_flagfile` writes them all as a valid absl
flagfile that reproduces the run (`MODEL_DIR/flags.txt`), and `check_setting` validates a value
wherever it comes from (flags, flags.txt, a benchmark variant). Adding a setting is one line here
(plus, if it depends on other settings, a rule in `flags.validate`). Derived values (per-replica
batch, steps per epoch, total steps) are computed in one place, `derive`, once the strategy knows
the number of replicas.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

from convmixer_dist.errors import UsageError
from convmixer_dist.presets import ACTIVATIONS, PRESETS

STRATEGIES = ("one_device", "mirrored", "multi_worker")
DATASETS = ("cifar10", "cifar100", "synthetic", "image_folder", "tfrecord")
ERASE_MODES = ("const", "pixel")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
LR_SCHEDULES = ("onecycle", "cosine", "constant")
AUGMENTS = ("none", "basic", "rrc")
ALL_REDUCES = ("auto", "nccl", "hierarchical_copy", "ring")
CLUSTERS = ("auto", "tf_config", "slurm")
XLA_MODES = ("auto", "on", "off")
ALLREDUCE_DTYPES = ("float32", "bfloat16", "float16")
KERNELS = ("auto", "fused", "keras")
NAN_POLICIES = ("stop", "rollback")
# The run's identity: flags a resumed run must share with the run that wrote the checkpoint (the
# model's shape, the dataset, and what defines the data split and stream; resume_check.py). Others
# (epochs, strategy, ...) may change between restarts.
IDENTITY_FIELDS = ("model", "hidden_dim", "depth", "kernel_size", "patch_size", "activation",
                   "dataset", "num_classes", "image_size", "precision",
                   "validation_fraction", "seed", "global_batch_size")


MODELS = tuple(sorted(PRESETS))
# Former flag names still accepted (on the command line, in flagfiles and in older runs' flags.txt):
# the splits are train / validation / test everywhere, and "eval" used to mean the test split.
RENAMED_SETTINGS = {"synthetic_eval_size": "synthetic_test_size"}
INT_LIMIT = 2 ** 31  # Step counts, sizes and seeds become int32/int64 TensorFlow values.


def setting(default: Any, help: str, *, choices: Optional[Sequence[str]] = None,
            bounds: Optional[tuple[float, float, str]] = None, unset: Optional[str] = None,
            flagfile: bool = True) -> Any:
    """A Config field that is also a flag `--NAME` (NAME = the field's name).

    `help` is the flag's help text; `choices` makes it an enum. `bounds=(low, high, "[)")` is the
    value's own interval ("[]", "[)", "(]" or "()"), checked by `check_setting` wherever the value
    comes from (flags, flags.txt, a benchmark variant); floats must also be finite. Every numeric
    setting has bounds; its upper bound refuses values that can only be typos. `unset="preset"` (a
    model size from `--model`) or `unset="dataset"` (from `--dataset`) gives the flag no default:
    unset, `flags.resolve` fills it in, and the field's default is that of the default preset or
    dataset. `flagfile=False`: never written to flags.txt, for an action of this invocation only
    (e.g. --overwrite) and for --model_dir (a run's flags.txt never says where the run lives: the
    directory holding it does, so a copied or moved run resumes where it is now).
    """
    return dataclasses.field(default=default, metadata=dict(
        help=help, choices=tuple(choices) if choices is not None else None, bounds=bounds, unset=unset,
        flagfile=flagfile))


def settings() -> tuple[dataclasses.Field, ...]:
    """The Config fields, each one a flag, in declaration order."""
    return dataclasses.fields(Config)


def setting_field(name: str) -> dataclasses.Field:
    for field in settings():
        if field.name == name:
            return field
    raise KeyError(name)


def setting_type(field: dataclasses.Field) -> str:
    """'bool', 'int', 'float' or 'str' (the annotation, whether or not postponed)."""
    return field.type if isinstance(field.type, str) else field.type.__name__


def value_from_text(name: str, text: str) -> Any:
    """The typed value of `--name=text` (as in a flagfile); ValueError if `text` is not one."""
    kind = setting_type(setting_field(name))
    if kind == "bool":
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--{name}={text} is not a valid bool")
        return text.lower() in ("true", "1")
    try:
        return {"int": int, "float": float, "str": str}[kind](text)
    except ValueError:
        raise ValueError(f"--{name}={text} is not a valid {kind}") from None


def check_range(name: str, value: float, low: float, high: float, bounds: str) -> None:
    """UsageError naming `--name` unless `value` is a finite number inside the interval."""
    inside = ((isinstance(value, int) or math.isfinite(value))
              and (low <= value if bounds[0] == "[" else low < value)
              and (value <= high if bounds[1] == "]" else value < high))
    if not inside:
        kind = "an integer" if isinstance(value, int) else "a finite number"
        raise UsageError(f"--{name}={value}: expected {kind} in {bounds[0]}{low:g}, {high:g}{bounds[1]}")


def check_setting(name: str, value: Any) -> None:
    """Raise UsageError `--name=value: expected ...` if `value` breaks the field's choices or bounds."""
    meta = setting_field(name).metadata
    if value is None:
        return
    if meta["choices"] is not None and value not in meta["choices"]:
        raise UsageError(f"--{name}={value}: expected one of {', '.join(meta['choices'])}")
    if meta["bounds"] is not None:
        check_range(name, value, *meta["bounds"])


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


# The first line of every run's flags.txt (since the first version): how `flags.run_directory`
# recognises a run's own flags file among flagfiles.
RUN_FLAGS_HEADER = "# Resolved flags of this run; rerun with --flagfile=<this file>."


def read_flagfile(path: str) -> dict[str, str]:
    """`--name=value` lines of a flagfile written by `Config.to_flagfile` (comments skipped); a
    setting's former name (`RENAMED_SETTINGS`, in flags.txt of older runs) reads as its current one."""
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("--") and "=" in line:
                name, value = line[2:].split("=", 1)
                values[RENAMED_SETTINGS.get(name, name)] = value
    return values


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on; each field is the flag of the same name (see `setting`)."""

    # Distribution.
    strategy: str = setting("one_device", "tf.distribute strategy.", choices=STRATEGIES)
    num_gpus: int = setting(-1, "GPUs to use with one_device/mirrored; -1 = all visible.",
                            bounds=(-1, 4096, "[]"))
    cpu_replicas: int = setting(1, "Split the host CPU into N logical devices so `mirrored` runs N "
                                "replicas without GPUs (testing/development).", bounds=(1, 1024, "[]"))
    all_reduce: str = setting("auto", "Cross-replica all-reduce: auto, nccl, hierarchical_copy "
                              "(mirrored), ring (multi_worker).", choices=ALL_REDUCES)
    cluster: str = setting("auto", "Where multi_worker reads the cluster from: TF_CONFIG, Slurm's "
                           "environment (under srun), or auto.", choices=CLUSTERS)
    collective_timeout: float = setting(300.0, "Seconds before a collective op gives up on a dead peer "
                                        "(multi_worker).", bounds=(0, 7 * 86400, "(]"))
    startup_timeout: float = setting(300.0, "multi_worker: seconds a worker waits for all its peers at "
                                     "start-up before exiting with one line naming the missing task.",
                                     bounds=(0, 7 * 86400, "(]"))
    # Model (resolved from --model plus overrides).
    model: str = setting("convmixer_256_8", "Model preset; the flags below override it.", choices=MODELS)
    hidden_dim: int = setting(256, "Channels h (preset's if unset).", unset="preset",
                              bounds=(1, 65536, "[]"))
    depth: int = setting(8, "Number of ConvMixer blocks d (preset's if unset).", unset="preset",
                         bounds=(1, 1024, "[]"))
    kernel_size: int = setting(5, "Depthwise kernel size k (preset's if unset).", unset="preset",
                               bounds=(1, 1024, "[]"))
    patch_size: int = setting(2, "Patch size p (preset's if unset).", unset="preset",
                              bounds=(1, 1024, "[]"))
    activation: str = setting("gelu", "Activation (preset's if unset).", choices=ACTIVATIONS,
                              unset="preset")
    dropout_rate: float = setting(0.0, "Dropout before every block and before the head (paper: 0).",
                                  bounds=(0, 1, "[)"))
    sync_bn: bool = setting(False, "BatchNorm statistics over the global batch across replicas "
                            "(default: per replica, as PyTorch DataParallel/DDP without SyncBatchNorm).")
    kernels: str = setting("auto", "BatchNorm, GELU and depthwise-conv implementations: auto = the "
                           "fastest measured per device (CPU: fused BatchNorm, XLA-fused GELU and the folded "
                           "depthwise filter gradient; GPU: fused BatchNorm), fused = auto plus the fused "
                           "GELU on GPU, keras = the plain Keras layers. Same variables and results.",
                           choices=KERNELS)
    # Data.
    dataset: str = setting("synthetic", "Training data.", choices=DATASETS)
    data_dir: str = setting("", "cifar10/cifar100: folder with the official python-format files "
                            "(cifar-10-batches-py / cifar-100-python) or their .tar.gz; empty = "
                            "keras.datasets download cache.")
    image_size: int = setting(32, "Input resolution (dataset's native size if unset).",
                              unset="dataset", bounds=(1, 16384, "[]"))
    num_classes: int = setting(10, "Classes of --dataset=synthetic.", bounds=(2, 1_000_000, "[]"))
    synthetic_train_size: int = setting(10000, "Training examples per epoch of synthetic data.",
                                        bounds=(1, INT_LIMIT, "[)"))
    synthetic_test_size: int = setting(1000, "Test-split examples of synthetic data (formerly "
                                       "--synthetic_eval_size, still accepted).",
                                       bounds=(1, INT_LIMIT, "[)"))
    augment: str = setting("basic", "basic = random crop with 4px padding (scaled with image size) + "
                           "horizontal flip; rrc = the reference recipe's random resized crop (area >= "
                           "--crop_scale) + horizontal flip; none = neither.", choices=AUGMENTS)
    crop_scale: float = setting(1.0, "With --augment=rrc: minimum crop area fraction (reference "
                                "--scale); 1 = flip only.", bounds=(0, 1, "(]"))
    crop_ratio: str = setting("1,1", "With --augment=rrc: LOW,HIGH aspect-ratio (w/h) range of the random "
                              "resized crop, sampled log-uniformly as timm (ImageNet: 0.75,1.3333333); "
                              "1,1 = square crops.")
    randaug_n: int = setting(0, "RandAugment operations per image (reference --ra-n); 0 = off.",
                             bounds=(0, 10, "[]"))
    randaug_m: float = setting(0.0, "RandAugment magnitude, torchvision scale 0..30 (reference --ra-m).",
                               bounds=(0, 30, "[]"))
    randaug_mstd: float = setting(0.0, "RandAugment magnitude noise: each op's magnitude ~ "
                                  "N(randaug_m, randaug_mstd) clipped to [0, 30], torchvision scale "
                                  "(timm mstd0.5 = 1.5).", bounds=(0, 30, "[]"))
    jitter: float = setting(0.0, "Colour jitter strength (brightness = contrast = saturation).",
                            bounds=(0, 1, "[)"))
    erase_prob: float = setting(0.0, "Random erasing probability per image (reference --reprob).",
                                bounds=(0, 1, "[]"))
    erase_mode: str = setting("const", "Random erasing fill: const = the dataset mean colour "
                              "(torchvision), pixel = timm's RandomErasing --remode pixel (its region rule, "
                              "per-pixel normal noise in normalized space).", choices=ERASE_MODES)
    mixup_alpha: float = setting(0.0, "MixUp Beta(alpha, alpha); 0 = off. Soft-label loss.",
                                 bounds=(0, 100, "[]"))
    cutmix_alpha: float = setting(0.0, "CutMix Beta(alpha, alpha) in (0, 1]; 0 = off. With MixUp, one "
                                  "of the two per batch (probability 0.5).", bounds=(0, 1, "[]"))
    augment_on_device: bool = setting(False, "Run the heavy augmentations (crop_scale, RandAugment, "
                                      "jitter, erasing, MixUp/CutMix) batched inside the training step on "
                                      "the accelerator instead of in tf.data on the host CPU.")
    decode_crop: bool = setting(True, "image_folder/tfrecord with --augment=rrc: decode only the crop "
                                "window of JPEGs (false: decode whole images, then crop the same window).")
    eval_crop_fraction: float = setting(1.0, "image_folder/tfrecord evaluation: resize the shorter side to "
                                        "image_size / fraction (bicubic), then centre-crop (timm crop_pct; "
                                        "ConvMixer: 0.96).", bounds=(0, 1, "(]"))
    tfrecord_label_offset: int = setting(1, "--dataset=tfrecord: subtracted from image/class/label (TF's "
                                         "ImageNet tooling and make_tfrecords store labels 1..N).",
                                         bounds=(-1_000_000, 1_000_000, "[]"))
    validation_fraction: float = setting(0.0, "Hold out this fraction of the training split (seeded) as "
                                         "a validation set evaluated each epoch; the test split is "
                                         "evaluated at the end.", bounds=(0, 1, "[)"))
    early_stopping_patience: int = setting(0, "Stop after this many epochs without a lower validation "
                                           "loss and restore the best weights; 0 = off. Needs "
                                           "--validation_fraction.", bounds=(0, INT_LIMIT, "[)"))
    # Optimization.
    global_batch_size: int = setting(128, "Batch size summed over all replicas.",
                                     bounds=(1, INT_LIMIT, "[)"))
    epochs: int = setting(1, "Training epochs (ignored when --train_steps is set).",
                          bounds=(1, INT_LIMIT, "[)"))
    train_steps: int = setting(0, "Total training steps; wins over --epochs when > 0.",
                               bounds=(0, INT_LIMIT, "[)"))
    steps_per_loop: int = setting(10, "Steps per tf.function call (host round trips amortised).",
                                  bounds=(1, INT_LIMIT, "[)"))
    learning_rate: float = setting(0.01, "Peak learning rate (AdamW).", bounds=(0, 10, "(]"))
    weight_decay: float = setting(0.01, "AdamW decoupled weight decay.", bounds=(0, 10, "[]"))
    wd_exclude_bias_bn: bool = setting(False, "No weight decay on biases and BatchNorm parameters (every "
                                       "1-D parameter), as timm.")
    grad_accum_steps: int = setting(1, "Micro-batches per optimizer step: each step accumulates K "
                                    "micro-batches of global_batch_size / K (one all-reduce per step).",
                                    bounds=(1, 65536, "[]"))
    adam_epsilon: float = setting(1e-8, "AdamW epsilon (PyTorch's default 1e-8; the paper's ImageNet runs "
                                  "use 1e-3).", bounds=(0, 1, "(]"))
    lr_schedule: str = setting("onecycle", "onecycle = reference CIFAR schedule (0 -> max at 2/5 -> "
                               "max/20 at 4/5 -> 0, per step).", choices=LR_SCHEDULES)
    warmup_steps: int = setting(0, "Linear warm-up steps for cosine/constant schedules.",
                                bounds=(0, INT_LIMIT, "[)"))
    label_smoothing: float = setting(0.0, "Label smoothing of the cross-entropy.", bounds=(0, 1, "[)"))
    clip_norm: float = setting(0.0, "Clip gradients by global norm (over all replicas); 0 = off.",
                               bounds=(0, 1e6, "[]"))
    allreduce_bucket_mb: float = setting(
        25.0, "Gradient all-reduce bucket size in MiB (as PyTorch DDP's bucket_cap_mb; the first "
        "bucket at most 1 MiB, as DDP's): buckets are reduced from the last layer to the first, so the "
        "late layers' reduction overlaps the rest of the backward pass; 0 = the whole gradient as one "
        "bucket.", bounds=(0, 1e5, "[]"))
    allreduce_dtype: str = setting(
        "float32", "Dtype of the gradient all-reduce (cast, summed, cast back): bfloat16 or float16 "
        "halve the bytes sent; float16 suits loss-scaled (mixed_float16) gradients, whose overflow "
        "the loss scale catches.", choices=ALLREDUCE_DTYPES)
    precision: str = setting("auto", "auto = mixed_bfloat16 on GPUs with compute capability >= 8.0, "
                             "mixed_float16 on 7.x; on CPU mixed_bfloat16 where it has bf16 units and "
                             "bf16 was measured faster on its kind for the model's size "
                             "(precision.BF16_MEASURED_FASTER, hidden_dim >= 256), else float32.", choices=PRECISIONS)
    xla: str = setting("auto", "XLA-compile the per-replica forward/backward; auto = on for GPUs, off on "
                       "CPU (where it is ~7x slower).", choices=XLA_MODES)
    # Output.
    model_dir: str = setting("runs/default", "Checkpoints, TensorBoard events, flags.txt, summary.json. "
                             "A rerun with the same directory resumes. Given on the command line it "
                             "wins over every flagfile; --flagfile=RUN/flags.txt means RUN (where the run "
                             "is now, also after a copy or move).", flagfile=False)
    checkpoint_every_steps: int = setting(1000, "Checkpoint period in steps (also at the end).",
                                          bounds=(1, INT_LIMIT, "[)"))
    keep_checkpoints: int = setting(3, "Checkpoints kept.", bounds=(1, 100000, "[]"))
    log_every_steps: int = setting(0, "Progress line period in steps; 0 = about 10 per epoch.",
                                   bounds=(0, INT_LIMIT, "[)"))
    profile_steps: str = setting("", "START,END: capture a TensorBoard profile of these steps into "
                                 "MODEL_DIR (chief only); empty = off.")
    profiler_port: int = setting(0, "Start the profiler server on this port for on-demand capture "
                                 "(TensorBoard's Capture profile: grpc://HOST:PORT); 0 = off.",
                                 bounds=(0, 65535, "[]"))
    profile_host_tracer_level: int = setting(2, "Host (CPU) tracer level 1-3 of --profile_steps.",
                                             bounds=(1, 3, "[]"))
    profile_python_tracer_level: int = setting(0, "Python tracer level 0-1 of --profile_steps.",
                                               bounds=(0, 1, "[]"))
    seed: int = setting(0, "Seed of initialisation, shuffling and augmentation.",
                        bounds=(0, INT_LIMIT, "[)"))
    # Reliability.
    deterministic: bool = setting(False, "Deterministic ops (tf.config.experimental."
                                  "enable_op_determinism): a killed and resumed run ends bit-identical to "
                                  "an uninterrupted one. Slower on GPUs.")
    nan_policy: str = setting("stop", "On a non-finite loss: stop (exit 3, last good checkpoint kept) or "
                              "roll back to the last checkpoint with a lower learning rate.",
                              choices=NAN_POLICIES)
    nan_max_rollbacks: int = setting(3, "Rollbacks before --nan_policy=rollback gives up.",
                                     bounds=(0, 1000, "[]"))
    nan_lr_factor: float = setting(0.5, "Learning-rate multiplier applied at each rollback.",
                                   bounds=(0, 1, "()"))
    # Actions and test hooks of this invocation only: never written to flags.txt.
    overwrite: bool = setting(False, "Start fresh: move an existing --model_dir aside "
                              "(MODEL_DIR.old-TIMESTAMP) instead of resuming from it.", flagfile=False)
    fault_inject_nan_at_step: int = setting(0, "Testing: make the loss NaN once at this step.",
                                            flagfile=False, bounds=(0, INT_LIMIT, "[)"))

    def to_flagfile(self) -> str:
        """The config as an absl flagfile (one `--name=value` line per field)."""
        lines = [RUN_FLAGS_HEADER]
        for field in dataclasses.fields(self):
            if not field.metadata["flagfile"]:
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


def derive(config: Config, num_replicas: int, train_size: int, eval_size: int) -> Derived:
    """Per-replica batch, steps per epoch and total steps of `train_size` training examples (the
    data pipeline's `trained_sizes`); `--train_steps` wins over `--epochs`."""
    divisor = num_replicas * config.grad_accum_steps  # each replica's micro-batch must be whole
    if config.global_batch_size % divisor:
        accum = f" x --grad_accum_steps={config.grad_accum_steps}" if config.grad_accum_steps > 1 else ""
        raise UsageError(
            f"--global_batch_size={config.global_batch_size} is not divisible by the "
            f"{num_replicas} replicas of --strategy={config.strategy}{accum}; use a multiple of {divisor}")
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
