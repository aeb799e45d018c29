"""All command-line flags of `python -m convmixer_dist.main`, and their conversion into a `Config`.

Only `config_from_flags` reads `FLAGS`; everything else takes the frozen `Config`. Validation happens
here, before TensorFlow is imported, so a user mistake costs a fraction of a second and produces one
line (`error: ...`, exit code 2) without any TensorFlow log noise.
"""
from __future__ import annotations

import json
import math
import os

from absl import flags

from convmixer_dist import config as cfg
from convmixer_dist.errors import UsageError
from convmixer_dist.presets import ACTIVATIONS, PRESETS
from convmixer_dist.profiling import parse_profile_steps

FLAGS = flags.FLAGS

# Distribution.
flags.DEFINE_enum("strategy", "one_device", cfg.STRATEGIES, "tf.distribute strategy.")
flags.DEFINE_integer("num_gpus", -1, "GPUs to use with one_device/mirrored; -1 = all visible.")
flags.DEFINE_integer("cpu_replicas", 1, "Split the host CPU into N logical devices so `mirrored` runs "
                     "N replicas without GPUs (testing/development).")
flags.DEFINE_enum("all_reduce", "auto", cfg.ALL_REDUCES, "Cross-replica all-reduce: auto, nccl, "
                  "hierarchical_copy (mirrored), ring (multi_worker).")
flags.DEFINE_enum("cluster", "auto", cfg.CLUSTERS, "Where multi_worker reads the cluster from: "
                  "TF_CONFIG, Slurm's environment (under srun), or auto.")
flags.DEFINE_float("collective_timeout", 300.0, "Seconds before a collective op gives up on a dead "
                   "peer (multi_worker).")
# Model.
flags.DEFINE_enum("model", "convmixer_256_8", sorted(PRESETS), "Model preset; the flags below override it.")
flags.DEFINE_integer("hidden_dim", None, "Channels h (preset's if unset).")
flags.DEFINE_integer("depth", None, "Number of ConvMixer blocks d (preset's if unset).")
flags.DEFINE_integer("kernel_size", None, "Depthwise kernel size k (preset's if unset).")
flags.DEFINE_integer("patch_size", None, "Patch size p (preset's if unset).")
flags.DEFINE_enum("activation", None, ACTIVATIONS, "Activation (preset's if unset).")
flags.DEFINE_float("dropout_rate", 0.0, "Dropout before every block and before the head (paper: 0).")
flags.DEFINE_boolean("sync_bn", False, "BatchNorm statistics over the global batch across replicas "
                     "(default: per replica, as PyTorch DataParallel/DDP without SyncBatchNorm).")
# Data.
flags.DEFINE_enum("dataset", "synthetic", cfg.DATASETS, "Training data.")
flags.DEFINE_string("data_dir", "", "cifar10/cifar100: folder with the official python-format files "
                    "(cifar-10-batches-py / cifar-100-python) or their .tar.gz; empty = keras.datasets "
                    "download cache.")
flags.DEFINE_integer("image_size", None, "Input resolution (dataset's native size if unset).")
flags.DEFINE_integer("num_classes", 10, "Classes of --dataset=synthetic.")
flags.DEFINE_integer("synthetic_train_size", 10000, "Training examples per epoch of synthetic data.")
flags.DEFINE_integer("synthetic_eval_size", 1000, "Evaluation examples of synthetic data.")
flags.DEFINE_enum("augment", "basic", cfg.AUGMENTS, "basic = random crop with 4px padding (scaled "
                  "with image size) + horizontal flip; rrc = the reference recipe's random resized "
                  "crop (area >= --crop_scale) + horizontal flip; none = neither.")
flags.DEFINE_float("crop_scale", 1.0, "With --augment=rrc: minimum crop area fraction (reference "
                   "--scale); 1 = flip only.")
flags.DEFINE_string("crop_ratio", "1,1", "With --augment=rrc: LOW,HIGH aspect-ratio (w/h) range of the "
                    "random resized crop, sampled log-uniformly as timm (ImageNet: 0.75,1.3333333); "
                    "1,1 = square crops.")
flags.DEFINE_integer("randaug_n", 0, "RandAugment operations per image (reference --ra-n); 0 = off.")
flags.DEFINE_float("randaug_m", 0.0, "RandAugment magnitude, torchvision scale 0..30 (reference --ra-m).")
flags.DEFINE_float("randaug_mstd", 0.0, "RandAugment magnitude noise: each op's magnitude ~ "
                   "N(randaug_m, randaug_mstd) clipped to [0, 30], torchvision scale (timm mstd0.5 = 1.5).")
flags.DEFINE_float("jitter", 0.0, "Colour jitter strength (brightness = contrast = saturation).")
flags.DEFINE_float("erase_prob", 0.0, "Random erasing probability per image (reference --reprob).")
flags.DEFINE_enum("erase_mode", "const", cfg.ERASE_MODES, "Random erasing fill: const = the "
                  "dataset mean colour (torchvision), pixel = per-pixel normal noise in normalized "
                  "space (timm --remode pixel).")
flags.DEFINE_float("mixup_alpha", 0.0, "MixUp Beta(alpha, alpha); 0 = off. Soft-label loss.")
flags.DEFINE_float("cutmix_alpha", 0.0, "CutMix Beta(alpha, alpha) in (0, 1]; 0 = off. With MixUp, "
                   "one of the two per batch (probability 0.5).")
flags.DEFINE_float("validation_fraction", 0.0, "Hold out this fraction of the training split (seeded) "
                   "as a validation set evaluated each epoch; the test split is evaluated at the end.")
flags.DEFINE_integer("early_stopping_patience", 0, "Stop after this many epochs without a lower "
                     "validation loss and restore the best weights; 0 = off. Needs --validation_fraction.")
flags.DEFINE_boolean("augment_on_device", False, "Run the heavy augmentations (crop_scale, RandAugment, "
                     "jitter, erasing, MixUp/CutMix) batched inside the training step on the "
                     "accelerator instead of in tf.data on the host CPU.")
flags.DEFINE_boolean("decode_crop", True, "image_folder/tfrecord with --augment=rrc: decode only the "
                     "crop window of JPEGs (false: decode whole images, then crop the same window).")
flags.DEFINE_float("eval_crop_fraction", 1.0, "image_folder/tfrecord evaluation: resize the shorter side "
                   "to image_size / fraction (bicubic), then centre-crop (timm crop_pct; ConvMixer: 0.96).")
flags.DEFINE_integer("tfrecord_label_offset", 1, "--dataset=tfrecord: subtracted from image/class/label "
                     "(TF's ImageNet tooling and the converter store labels 1..N).")
# Optimization.
flags.DEFINE_integer("global_batch_size", 128, "Batch size summed over all replicas.")
flags.DEFINE_integer("epochs", 1, "Training epochs (ignored when --train_steps is set).")
flags.DEFINE_integer("train_steps", 0, "Total training steps; wins over --epochs when > 0.")
flags.DEFINE_integer("steps_per_loop", 10, "Steps per tf.function call (host round trips amortised).")
flags.DEFINE_float("learning_rate", 0.01, "Peak learning rate (AdamW).")
flags.DEFINE_float("weight_decay", 0.01, "AdamW decoupled weight decay.")
flags.DEFINE_boolean("wd_exclude_bias_bn", False, "No weight decay on biases and BatchNorm "
                     "parameters (every 1-D parameter), as timm.")
flags.DEFINE_integer("grad_accum_steps", 1, "Micro-batches per optimizer step: each step accumulates "
                     "K micro-batches of global_batch_size / K (one all-reduce per step).")
flags.DEFINE_float("adam_epsilon", 1e-8, "AdamW epsilon (PyTorch's default 1e-8; the paper's ImageNet "
                   "runs use 1e-3).")
flags.DEFINE_enum("lr_schedule", "onecycle", cfg.LR_SCHEDULES, "onecycle = reference CIFAR schedule "
                  "(0 -> max at 2/5 -> max/20 at 4/5 -> 0, per step).")
flags.DEFINE_integer("warmup_steps", 0, "Linear warm-up steps for cosine/constant schedules.")
flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing of the cross-entropy.")
flags.DEFINE_float("clip_norm", 0.0, "Clip gradients by global norm (over all replicas); 0 = off.")
flags.DEFINE_enum("precision", "auto", cfg.PRECISIONS, "auto = mixed_bfloat16 on GPUs with compute "
                  "capability >= 8.0, mixed_float16 on 7.x, float32 on CPU.")
flags.DEFINE_enum("xla", "auto", cfg.XLA_MODES, "XLA-compile the per-replica forward/backward; auto = "
                  "on for GPUs, off on CPU (where it is ~7x slower).")
# Output.
flags.DEFINE_string("model_dir", "runs/default", "Checkpoints, TensorBoard events, flags.txt, "
                    "summary.json. A rerun with the same directory resumes.")
flags.DEFINE_integer("checkpoint_every_steps", 1000, "Checkpoint period in steps (also at the end).")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
flags.DEFINE_integer("log_every_steps", 0, "Progress line period in steps; 0 = about 10 per epoch.")
flags.DEFINE_string("profile_steps", "", "START,END: capture a TensorBoard profile of these steps "
                    "into MODEL_DIR (chief only); empty = off.")
flags.DEFINE_integer("profiler_port", 0, "Start the profiler server on this port for on-demand capture "
                     "(TensorBoard's Capture profile: grpc://HOST:PORT); 0 = off.")
flags.DEFINE_integer("profile_host_tracer_level", 2, "Host (CPU) tracer level 1-3 of --profile_steps.")
flags.DEFINE_integer("profile_python_tracer_level", 0, "Python tracer level 0-1 of --profile_steps.")
flags.DEFINE_integer("seed", 0, "Seed of initialisation, shuffling and augmentation.")
# Reliability.
flags.DEFINE_boolean("deterministic", False, "Deterministic ops (tf.config.experimental."
                     "enable_op_determinism): a killed and resumed run ends bit-identical to an "
                     "uninterrupted one. Slower on GPUs.")
flags.DEFINE_enum("nan_policy", "stop", cfg.NAN_POLICIES, "On a non-finite loss: stop (exit 3, last good "
                  "checkpoint kept) or roll back to the last checkpoint with a lower learning rate.")
flags.DEFINE_integer("nan_max_rollbacks", 3, "Rollbacks before --nan_policy=rollback gives up.")
flags.DEFINE_float("nan_lr_factor", 0.5, "Learning-rate multiplier applied at each rollback.")
flags.DEFINE_boolean("overwrite", False, "Start fresh: move an existing --model_dir aside "
                     "(MODEL_DIR.old-TIMESTAMP) instead of resuming from it.")
flags.DEFINE_integer("fault_inject_nan_at_step", 0, "Testing: make the loss NaN once at this step.")


INT_LIMIT = 2 ** 31  # Step counts, sizes and seeds become int32/int64 TensorFlow values.
# Each numeric flag's own range, checked whatever else is set: (low, high, bounds) where bounds is
# "[]", "[)", "(]" or "()". Float flags must also be finite; the upper bounds refuse values that can
# only be typos (--learning_rate=1e308 "trains" into NaN after writing checkpoints).
RANGES: dict[str, tuple[float, float, str]] = {
    # Distribution.
    "num_gpus": (-1, 4096, "[]"), "cpu_replicas": (1, 1024, "[]"),
    "collective_timeout": (0, 7 * 86400, "(]"),
    # Model.
    "hidden_dim": (1, 65536, "[]"), "depth": (1, 1024, "[]"), "kernel_size": (1, 1024, "[]"),
    "patch_size": (1, 1024, "[]"), "dropout_rate": (0, 1, "[)"),
    # Data.
    "image_size": (1, 16384, "[]"), "num_classes": (2, 1_000_000, "[]"),
    "synthetic_train_size": (1, INT_LIMIT, "[)"), "synthetic_eval_size": (1, INT_LIMIT, "[)"),
    "crop_scale": (0, 1, "(]"), "randaug_n": (0, 10, "[]"), "randaug_m": (0, 30, "[]"),
    "jitter": (0, 1, "[)"), "erase_prob": (0, 1, "[]"), "mixup_alpha": (0, 100, "[]"),
    "cutmix_alpha": (0, 1, "[]"), "validation_fraction": (0, 1, "[)"),
    "randaug_mstd": (0, 30, "[]"), "eval_crop_fraction": (0, 1, "(]"),
    "tfrecord_label_offset": (-1_000_000, 1_000_000, "[]"),
    "early_stopping_patience": (0, INT_LIMIT, "[)"),
    # Optimization.
    "global_batch_size": (1, INT_LIMIT, "[)"), "epochs": (1, INT_LIMIT, "[)"),
    "train_steps": (0, INT_LIMIT, "[)"), "steps_per_loop": (1, INT_LIMIT, "[)"),
    "learning_rate": (0, 10, "(]"), "weight_decay": (0, 10, "[]"), "adam_epsilon": (0, 1, "(]"),
    "warmup_steps": (0, INT_LIMIT, "[)"), "label_smoothing": (0, 1, "[)"),
    "clip_norm": (0, 1e6, "[]"), "grad_accum_steps": (1, 65536, "[]"),
    # Output.
    "checkpoint_every_steps": (1, INT_LIMIT, "[)"), "keep_checkpoints": (1, 100000, "[]"),
    "log_every_steps": (0, INT_LIMIT, "[)"), "profiler_port": (0, 65535, "[]"),
    "profile_host_tracer_level": (1, 3, "[]"), "profile_python_tracer_level": (0, 1, "[]"),
    "seed": (0, INT_LIMIT, "[)"),
    # Reliability.
    "nan_max_rollbacks": (0, 1000, "[]"), "nan_lr_factor": (0, 1, "()"),
    "fault_inject_nan_at_step": (0, INT_LIMIT, "[)"),
}


def check_range(name: str, value: float, low: float, high: float, bounds: str) -> None:
    """UsageError naming `--name` unless `value` is a finite number inside the interval."""
    inside = ((isinstance(value, int) or math.isfinite(value))
              and (low <= value if bounds[0] == "[" else low < value)
              and (value <= high if bounds[1] == "]" else value < high))
    if not inside:
        kind = "an integer" if isinstance(value, int) else "a finite number"
        raise UsageError(f"--{name}={value}: expected {kind} in {bounds[0]}{low:g}, {high:g}{bounds[1]}")


def validate(c: cfg.Config) -> None:
    """Raise UsageError (one line naming the flag) for any invalid value or combination of values."""
    for name, (low, high, bounds) in RANGES.items():
        check_range(name, getattr(c, name), low, high, bounds)
    if c.early_stopping_patience and not c.validation_fraction:
        raise UsageError("--early_stopping_patience needs --validation_fraction > 0 (the test split is "
                         "never used for model selection)")
    parse_profile_steps(c.profile_steps)
    try:
        ratio = cfg.parse_crop_ratio(c.crop_ratio)
    except ValueError:
        raise UsageError(f"--crop_ratio={c.crop_ratio!r}: expected LOW,HIGH with 0 < LOW <= HIGH "
                         "(e.g. 0.75,1.3333333)") from None
    if ratio != (1.0, 1.0) and c.augment != "rrc":
        raise UsageError(f"--crop_ratio={c.crop_ratio} applies to --augment=rrc (got --augment={c.augment})")
    if c.global_batch_size % c.grad_accum_steps:
        raise UsageError(f"--global_batch_size={c.global_batch_size} is not divisible by "
                         f"--grad_accum_steps={c.grad_accum_steps}")
    if c.crop_scale < 1.0 and c.augment != "rrc":
        raise UsageError(f"--crop_scale={c.crop_scale} applies to --augment=rrc (got --augment={c.augment})")
    if c.image_size % c.patch_size:
        raise UsageError(f"--patch_size={c.patch_size} does not divide --image_size={c.image_size}: "
                         "the patch embedding would drop border pixels; pick a divisor")
    grid = c.image_size // c.patch_size
    if c.kernel_size > 2 * grid - 1:
        raise UsageError(f"--kernel_size={c.kernel_size} is too large for a {grid}x{grid} patch grid "
                         f"(--image_size={c.image_size} / --patch_size={c.patch_size}); expected <= "
                         f"{2 * grid - 1}")
    if c.cpu_replicas > 1 and c.strategy != "mirrored":
        raise UsageError(f"--cpu_replicas={c.cpu_replicas} needs --strategy=mirrored")
    if c.all_reduce == "ring" and c.strategy != "multi_worker":
        raise UsageError("--all_reduce=ring is a multi_worker option; use auto, nccl or hierarchical_copy")
    if c.all_reduce == "hierarchical_copy" and c.strategy != "mirrored":
        raise UsageError("--all_reduce=hierarchical_copy is a mirrored option; use auto, ring or nccl")
    if c.data_dir and not os.path.exists(c.data_dir):
        raise UsageError(f"--data_dir={c.data_dir} does not exist: expected the folder holding "
                         f"the {c.dataset} files (or their .tar.gz)")
    if c.dataset == "tfrecord" and c.validation_fraction:
        raise UsageError("--validation_fraction needs random access to the training examples; "
                         "--dataset=tfrecord reads them as streams (hold out shards instead)")
    if c.dataset == "tfrecord" and not c.data_dir:
        raise UsageError("--dataset=tfrecord needs --data_dir=DIR with train-* and validation-* shards")
    if c.dataset == "image_folder" and not c.data_dir:
        raise UsageError("--dataset=image_folder needs --data_dir=DIR with DIR/train/<class>/ and DIR/val/<class>/")
    if c.dataset == "synthetic" and c.data_dir:
        raise UsageError("--data_dir is not used by --dataset=synthetic; drop it or pick a real dataset")
    if not c.model_dir:
        raise UsageError("--model_dir is empty: expected a directory for checkpoints and logs")


def _count_class_folders(data_dir: str) -> int:
    """Classes of an image_folder tree: the subfolders of DATA_DIR/train (read before TensorFlow)."""
    train = os.path.join(data_dir, "train")
    if not data_dir or not os.path.isdir(train):
        raise UsageError(f"--data_dir={data_dir!r}: --dataset=image_folder expects DIR/train/<class>/*.jpg "
                         "and DIR/val/<class>/*.jpg")
    return len([d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d))])


def _tfrecord_classes(data_dir: str, num_classes: int) -> int:
    """Classes of a TFRecord directory: DATA_DIR/class_names.json if the converter wrote it, else
    --num_classes (TF's ImageNet tooling writes no names: pass --num_classes=1000)."""
    path = os.path.join(data_dir or "", "class_names.json")
    if not data_dir or not os.path.isfile(path):
        return num_classes
    try:
        with open(path) as f:
            names = json.load(f)
    except (OSError, ValueError):
        raise UsageError(f"{path}: not a JSON list of class names") from None
    if not isinstance(names, list):
        raise UsageError(f"{path}: not a JSON list of class names")
    return len(names)


def config_from_flags() -> cfg.Config:
    """Resolve presets, dataset defaults and overrides from parsed FLAGS into a validated Config."""
    preset = PRESETS[FLAGS.model]

    def pick(name: str):
        value = getattr(FLAGS, name)
        return preset[name] if value is None else value

    if FLAGS.dataset in cfg.DATASET_CLASSES:
        num_classes = cfg.DATASET_CLASSES[FLAGS.dataset]
    else:
        num_classes = FLAGS.num_classes
    if FLAGS.dataset == "image_folder":
        num_classes = _count_class_folders(FLAGS.data_dir)
    if FLAGS.dataset == "tfrecord":
        num_classes = _tfrecord_classes(FLAGS.data_dir, FLAGS.num_classes)
    image_size = FLAGS.image_size or cfg.NATIVE_IMAGE_SIZE.get(
        FLAGS.dataset, preset["image_size"] if FLAGS.dataset in ("image_folder", "tfrecord") else 32)
    config = cfg.Config(
        strategy=FLAGS.strategy, num_gpus=FLAGS.num_gpus, cpu_replicas=FLAGS.cpu_replicas,
        all_reduce=FLAGS.all_reduce, cluster=FLAGS.cluster, collective_timeout=FLAGS.collective_timeout,
        model=FLAGS.model, hidden_dim=pick("hidden_dim"), depth=pick("depth"),
        kernel_size=pick("kernel_size"), patch_size=pick("patch_size"), activation=pick("activation"),
        dropout_rate=FLAGS.dropout_rate, sync_bn=FLAGS.sync_bn,
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, image_size=image_size, num_classes=num_classes,
        synthetic_train_size=FLAGS.synthetic_train_size, synthetic_eval_size=FLAGS.synthetic_eval_size,
        augment=FLAGS.augment, crop_scale=FLAGS.crop_scale, randaug_n=FLAGS.randaug_n,
        crop_ratio=FLAGS.crop_ratio, randaug_mstd=FLAGS.randaug_mstd, erase_mode=FLAGS.erase_mode,
        decode_crop=FLAGS.decode_crop, eval_crop_fraction=FLAGS.eval_crop_fraction,
        tfrecord_label_offset=FLAGS.tfrecord_label_offset, wd_exclude_bias_bn=FLAGS.wd_exclude_bias_bn,
        grad_accum_steps=FLAGS.grad_accum_steps,
        randaug_m=FLAGS.randaug_m, jitter=FLAGS.jitter, erase_prob=FLAGS.erase_prob,
        mixup_alpha=FLAGS.mixup_alpha, cutmix_alpha=FLAGS.cutmix_alpha,
        augment_on_device=FLAGS.augment_on_device,
        global_batch_size=FLAGS.global_batch_size, epochs=FLAGS.epochs, train_steps=FLAGS.train_steps,
        steps_per_loop=FLAGS.steps_per_loop, learning_rate=FLAGS.learning_rate,
        weight_decay=FLAGS.weight_decay, adam_epsilon=FLAGS.adam_epsilon,
        validation_fraction=FLAGS.validation_fraction,
        early_stopping_patience=FLAGS.early_stopping_patience, lr_schedule=FLAGS.lr_schedule, warmup_steps=FLAGS.warmup_steps,
        label_smoothing=FLAGS.label_smoothing, clip_norm=FLAGS.clip_norm, precision=FLAGS.precision,
        xla=FLAGS.xla, model_dir=FLAGS.model_dir, checkpoint_every_steps=FLAGS.checkpoint_every_steps,
        keep_checkpoints=FLAGS.keep_checkpoints, log_every_steps=FLAGS.log_every_steps, seed=FLAGS.seed,
        profile_steps=FLAGS.profile_steps, profiler_port=FLAGS.profiler_port,
        profile_host_tracer_level=FLAGS.profile_host_tracer_level,
        profile_python_tracer_level=FLAGS.profile_python_tracer_level,
        deterministic=FLAGS.deterministic, nan_policy=FLAGS.nan_policy,
        nan_max_rollbacks=FLAGS.nan_max_rollbacks, nan_lr_factor=FLAGS.nan_lr_factor,
        overwrite=FLAGS.overwrite, fault_inject_nan_at_step=FLAGS.fault_inject_nan_at_step)
    validate(config)
    return config
