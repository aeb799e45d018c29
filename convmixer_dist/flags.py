"""All command-line flags of `python -m convmixer_dist.main`, generated from the `Config` fields, and
their conversion into a `Config`.

A setting is declared once, as a `config.Config` field (`config.setting`: default, help text, choices,
bounds); this module defines one absl flag per field (enum / integer / float / boolean / string by the
field's type) and reads them back generically. Only this module reads `FLAGS`; everything else takes
the frozen `Config`. Validation happens here, before TensorFlow is imported, so a user mistake costs a
fraction of a second and produces one line (`error: ...`, exit code 2) without any TensorFlow log noise.
"""
from __future__ import annotations

import math
import os
import types
from typing import Any, Callable, Optional

from absl import app, flags, logging

from convmixer_dist import config as cfg
from convmixer_dist import errors
from convmixer_dist.data import registry
from convmixer_dist.errors import UsageError, check_flagfiles, report_and_exit
from convmixer_dist.presets import PRESETS
from convmixer_dist.profiling import parse_profile_steps

FLAGS = flags.FLAGS
# Each numeric flag's own interval (low, high, "[)"), as declared on its Config field.
RANGES: dict[str, tuple[float, float, str]] = {
    field.name: field.metadata["bounds"] for field in cfg.settings() if field.metadata["bounds"]}
_DEFINE = {"bool": flags.DEFINE_boolean, "int": flags.DEFINE_integer, "float": flags.DEFINE_float,
           "str": flags.DEFINE_string}


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """One flag per Config field: its name, default (none when resolved from the preset or dataset),
    help text and, for fields with choices, an enum. Idempotent: defined flags are left alone."""
    for field in cfg.settings():
        if field.name in flag_values:
            continue
        meta = field.metadata
        default = None if meta["unset"] else field.default
        if meta["choices"] is not None:
            flags.DEFINE_enum(field.name, default, meta["choices"], meta["help"], flag_values=flag_values)
        else:
            _DEFINE[cfg.setting_type(field)](field.name, default, meta["help"], flag_values=flag_values)
    for old, new in cfg.RENAMED_SETTINGS.items():
        if old not in flag_values:
            flags.DEFINE_alias(old, new, flag_values=flag_values)


def define_number(name: str, default: float, lower: float, upper: float, help_text: str,
                  flag_values: flags.FlagValues = FLAGS) -> None:
    """A tool's own numeric flag with bounds, like a Config setting's: an integer flag when
    `default` is an int, else a float flag that must also be finite; a value outside
    [lower, upper] is one `error:` line (exit 2) naming the flag and the interval."""
    if isinstance(default, int) and not isinstance(default, bool):
        flags.DEFINE_integer(name, default, f"{help_text} ({lower}..{upper})", lower_bound=lower,
                             upper_bound=upper, flag_values=flag_values)
        return
    flags.DEFINE_float(name, default, f"{help_text} ({lower:g}..{upper:g})", lower_bound=lower,
                       upper_bound=upper, flag_values=flag_values)
    flags.register_validator(name, math.isfinite, message=f"--{name} must be a finite number",
                             flag_values=flag_values)


def validate(c: cfg.Config) -> None:
    """Raise UsageError (one line naming the flag) for any invalid value or combination of values."""
    for field in cfg.settings():
        cfg.check_setting(field.name, getattr(c, field.name))
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
    registry.source(c).check(c)
    if not c.model_dir:
        raise UsageError("--model_dir is empty: expected a directory for checkpoints and logs")


def values_from_flags(flag_values: flags.FlagValues = FLAGS) -> dict[str, Any]:
    """{field name: parsed flag value} for every Config field (None = unset, to be resolved)."""
    return {field.name: flag_values[field.name].value for field in cfg.settings()}


def resolve(values: dict[str, Any]) -> cfg.Config:
    """A validated Config from flag values: unset model sizes come from the preset of --model, the
    number of classes and the image size from the dataset."""
    preset = PRESETS[values["model"]]
    values = dict(values)
    for field in cfg.settings():
        if field.metadata["unset"] == "preset" and values[field.name] is None:
            values[field.name] = preset[field.name]
    described = registry.describe(cfg.Config(**values))  # classes and native size of the dataset
    values["num_classes"] = described.num_classes
    values["image_size"] = values["image_size"] or described.image_size or preset["image_size"]
    config = cfg.Config(**values)
    validate(config)
    return config


def config_from_flags(flag_values: flags.FlagValues = FLAGS) -> cfg.Config:
    """Resolve presets, dataset defaults and overrides from parsed FLAGS into a validated Config."""
    return resolve(values_from_flags(flag_values))


def overrides_from_flags(flag_values: flags.FlagValues = FLAGS) -> dict[str, str]:
    """Training flags given on this command line, as flagfile text (they replace a saved run's)."""
    return {field.name: cfg.flag_text(flag_values[field.name].value) for field in cfg.settings()
            if flag_values[field.name].present}


def _is_run_flags_file(path: str) -> bool:
    """Whether `path` is a run's own flags.txt (named so, starting with `config.RUN_FLAGS_HEADER`)."""
    path = os.path.expanduser(path)
    if os.path.basename(path) != "flags.txt":
        return False
    try:
        with open(path) as f:
            return f.readline().rstrip("\n") == cfg.RUN_FLAGS_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def run_directory(args: list[str]) -> Optional[str]:
    """The --model_dir a command line means where absl's left-to-right reading would say otherwise,
    else None. A --model_dir given on the command line itself wins over every flagfile
    (`--model_dir=X --flagfile=configs/quickstart.flags` trains into X); otherwise a run's own
    flags.txt given as --flagfile means that run's directory, wherever it is now (a copied run
    resumes in the copy, a moved one at its new place; the `--model_dir` line of older runs'
    flags.txt, the place they were written, is ignored)."""
    explicit = run_file = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            break
        name, has_value, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name in ("model_dir", "flagfile"):
            if not has_value:  # `--model_dir DIR`
                if i + 1 >= len(args):
                    break
                i += 1
                value = args[i]
            if name == "model_dir":
                explicit = value
            elif _is_run_flags_file(value):
                run_file = value
        i += 1
    if explicit is not None:
        return explicit
    if run_file is not None:
        return os.path.dirname(os.path.expanduser(run_file)) or "."
    return None


def place_run(args: list[str], flag_values: flags.FlagValues = FLAGS) -> None:
    """Set --model_dir as `run_directory(args)` says (and mark it given, as commands that reopen a
    run require it)."""
    if "model_dir" not in flag_values:
        return
    directory = run_directory(args)
    if directory is not None:
        flag_values["model_dir"].value = directory
        flag_values["model_dir"].using_default_value = False
        flag_values["model_dir"].present = max(1, flag_values["model_dir"].present)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose errors (unknown flag or value, missing or circular flagfile, a
    flagfile line that is not a flag) are one line with exit code 2 instead of absl's two lines and
    code 1 (or a warning and silently different flags); --model_dir then as `run_directory` says."""
    def parse() -> list[str]:
        try:
            errors.check_arguments_are_utf8(argv[1:])
            check_flagfiles(argv[1:])
            rest = FLAGS(argv)
            place_run(argv[1:])
            return rest
        except flags.Error as err:
            raise UsageError(str(err)) from None

    return guarded(parse)


def _last_checkpoint_note(model_dir: Optional[str]) -> str:
    """"; the last complete checkpoint is ..." for a message about a full disk under MODEL_DIR."""
    if not model_dir:
        return ""
    from convmixer_dist import rundir

    last = rundir.last_complete_checkpoint(model_dir)
    return (f"; the last complete checkpoint is {last} (rerun the same command to resume from it)"
            if last else "; no complete checkpoint was written yet")


def guarded(main: Callable[..., Any], *args: Any, model_dir: Callable[[], Optional[str]] = lambda: None
            ) -> Any:
    """Call `main(*args)` inside the one error boundary of every command: a UsageError, an error of
    the input or environment (`errors.environment_error`: file-system errors, text encodings,
    TensorFlow's missing/damaged-file errors) becomes one `error:` line and exit 2 (a full disk:
    exit 74, naming `model_dir()`'s last complete checkpoint), Ctrl-C one line and exit 130, a
    closed output pipe (`| head`) exit 141 without a word.
    Everything else is a bug and propagates with its traceback."""
    try:
        return main(*args)
    except UsageError as err:
        report_and_exit(err)
    except KeyboardInterrupt:
        errors.report_interrupt()
    except BrokenPipeError:  # `command | head`: the reader left; stop quietly as the shell's tools do
        errors.exit_on_broken_pipe()
    except Exception as exc:  # Only the kinds environment_error maps; a bug keeps its traceback.
        message = errors.environment_error(exc)
        if message is None:
            raise
        if errors.is_disk_full(exc) and not isinstance(exc, errors.DiskFull):
            message += _last_checkpoint_note(model_dir())
        errors.report_environment_error(exc, message)


def run_command(main: Callable[[list[str], types.SimpleNamespace], None],
                define: Optional[Callable[[], None]] = None, *, training: bool = False) -> None:
    """The one entry point shape of every command (`if __name__ == "__main__": run_command(...)`).

    Defines the training flags (`training=True`) and the command's own (`define`), parses the command
    line with the one-line-error parser, and calls `main(positional_args, opts)`: `opts` holds the
    command's own flag values by name, and with `training=True` also `opts.overrides` (the training
    flags given, as text; `config_from_flags()` resolves them all). A `UsageError`, and an error
    caused by the input or the environment, becomes one `error: ...` line and exit code 2 (`guarded`:
    74 for a full disk, 130 for Ctrl-C); a bug keeps its traceback. TensorFlow's native logs are off
    unless TF_CPP_MIN_LOG_LEVEL is set; commands import TensorFlow through `runtime.quiet_tensorflow_import` once their inputs are
    valid, so a user mistake prints exactly one line.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if training:
        define_flags()
    before = set(FLAGS)
    if define is not None:
        define()
    own = sorted(set(FLAGS) - before)

    def body(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # TensorFlow's Python INFO logs would drown the output.
        opts = types.SimpleNamespace(**{name: FLAGS[name].value for name in own})
        if training:
            opts.overrides = overrides_from_flags()
        guarded(main, argv[1:], opts,
                model_dir=lambda: FLAGS["model_dir"].value if "model_dir" in FLAGS else None)

    app.run(body, flags_parser=parse_flags)
