"""A command whose main raises what `--raise=KIND` names, to show what the one error boundary of
every command (`flags.run_command`) does with each kind of error (tests/test_error_boundary.py)."""
import errno
import types

from absl import flags

from convmixer_dist import errors
from convmixer_dist import flags as cli


def define_flags() -> None:
    flags.DEFINE_string("raise", "", "the kind of error main raises")
    flags.DEFINE_string("model_dir", "", "a run directory (named when the disk is full)")


def _exception(kind: str) -> BaseException:
    """The exception of KIND, as the code that meets it raises it."""
    from convmixer_dist.runtime import native_stderr_captured, quiet_tensorflow_import

    quiet_tensorflow_import()
    import tensorflow as tf

    with native_stderr_captured():  # the first device query's "cuInit" line of a CUDA build
        tf.constant(0)

    if kind == "enospc_write":  # what write() raises on a full disk: no file name
        return OSError(errno.ENOSPC, "No space left on device")
    if kind.startswith("errno_"):
        return OSError(getattr(errno, kind[len("errno_"):]), "(strerror)", "/some/where/file.txt")
    if kind == "unicode":
        try:
            b"caf\xe9".decode("utf-8")
        except UnicodeDecodeError as err:
            return err
    if kind in ("type_error", "key_error", "value_error"):  # bugs, made the way bugs are made
        try:
            {"type_error": lambda: len(5), "key_error": lambda: {}["missing"],
             "value_error": lambda: int("not a number")}[kind]()
        except Exception as err:  # noqa: BLE001
            return err
    return {
        "tf_no_space": tf.errors.ResourceExhaustedError(
            None, None, "{{function_node __wrapped__SaveV2}} /run/checkpoints/ckpt-3_temp/part-0; "
            "No space left on device [Op:SaveV2]"),
        "tf_oom": tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"),
        "tf_data_loss": tf.errors.DataLossError(None, None, "corrupted record at 12 in /data/train-0"),
        "tf_not_found": tf.errors.NotFoundError(None, None, "/data/x.jpg; No such file or directory"),
        "disk_full": errors.DiskFull("no space left saving ckpt-4; the last complete is ckpt-2"),
        "interrupt": KeyboardInterrupt(),
        "broken_pipe": BrokenPipeError(32, "Broken pipe"),
        "assertion": AssertionError("invariant broken"),
        "plain_oserror": OSError("no errno: a bug's message"),
    }[kind]


def main(args: list[str], opts: types.SimpleNamespace) -> None:
    del args
    raise _exception(opts.__dict__["raise"])


if __name__ == "__main__":
    cli.run_command(main, define_flags)
