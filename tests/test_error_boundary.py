"""The one error boundary of every command (`flags.run_command` -> `flags.guarded`): errors of the
input or the environment, by kind, become one `error:` line (exit 2; a full disk 74; Ctrl-C 130);
bugs keep their traceback. Many command lines run in one process tree (tests/command_driver.py)."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from convmixer_dist import errors, rundir
from convmixer_dist.errors import UsageError
from helpers import ROOT

PROBE = "boundary_probe"
TINY_RUN = ["--dataset=synthetic", "--synthetic_train_size=64", "--synthetic_test_size=32",
            "--hidden_dim=16", "--depth=2", "--kernel_size=3", "--patch_size=2", "--image_size=8",
            "--num_classes=4", "--global_batch_size=16", "--train_steps=4", "--steps_per_loop=2",
            "--checkpoint_every_steps=2"]


def run_batch(cases: list[dict], timeout: float = 600) -> list[dict]:
    """Run command lines ({"module", "argv", ...}) through tests/command_driver.py."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user runs it
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "command_driver.py")], env=env,
                          input=json.dumps(cases), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_errors_are_mapped_by_kind_not_everything():
    for number in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.ELOOP,
                   errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.EMLINK):
        message = errors.environment_error(OSError(number, os.strerror(number), "/data/x"))
        assert message.startswith("/data/x: ") and "\n" not in message, message
    assert "(a file the system did not name)" in errors.environment_error(OSError(errno.ENOSPC, "full"))
    assert errors.is_disk_full(OSError(errno.ENOSPC, "full"))
    assert not errors.is_disk_full(OSError(errno.EACCES, "denied"))
    try:
        b"\xff\xfe".decode("utf-8")
    except UnicodeDecodeError as err:
        assert "not valid utf-8" in errors.environment_error(err)
    for bug in (TypeError("x"), ValueError("x"), AssertionError("x"), KeyError("x"), RuntimeError("x"),
                OSError("an OSError without errno"), OSError(errno.EINVAL, "invalid argument")):
        assert errors.environment_error(bug) is None, bug


def _run_with_checkpoints(root) -> str:
    """MODEL_DIR with a complete ckpt-2 (the index names it) and a half-written ckpt-4."""
    run = root / "run" / "checkpoints"
    run.mkdir(parents=True)
    for name, data in (("ckpt-2.index", b"i"), ("ckpt-2.data-00000-of-00001", b"d"),
                       ("ckpt-4.index", b""), ("ckpt-4.data-00000-of-00001", b"d")):
        (run / name).write_bytes(data)
    (run / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-2"\n')
    assert rundir.last_complete_checkpoint(str(root / "run")) == str(run / "ckpt-2")
    return str(root / "run")


def test_every_kind_through_a_real_command_line(tmp_path):
    kinds = {  # kind -> (exit code, what the one line says)
        "errno_ENOSPC": (74, "/some/where/file.txt: no space left on the device"),
        "enospc_write": (74, "no space left"),
        "errno_EACCES": (2, "/some/where/file.txt: permission denied"),
        "errno_EROFS": (2, "read-only file system"),
        "errno_ELOOP": (2, "link loop"),
        "errno_ENAMETOOLONG": (2, "file name too long"),
        "errno_EISDIR": (2, "is a directory"),
        "errno_ENOTDIR": (2, "not a directory"),
        "unicode": (2, "not valid utf-8"),
        "tf_no_space": (74, "/run/checkpoints/ckpt-3_temp/part-0; No space left on device"),
        "tf_data_loss": (2, "corrupted record at 12 in /data/train-0: the file is truncated"),
        "tf_not_found": (2, "/data/x.jpg; No such file or directory: not found"),
        "disk_full": (74, "the last complete is ckpt-2"),
        "interrupt": (130, "interrupted"),
    }
    bugs = {"type_error": "TypeError", "value_error": "ValueError", "assertion": "AssertionError",
            "plain_oserror": "OSError", "key_error": "KeyError", "tf_oom": "ResourceExhaustedError"}
    names = list(kinds) + list(bugs)
    model_dir = _run_with_checkpoints(tmp_path)  # a full disk under a run names its last checkpoint
    cases = [{"module": PROBE, "argv": [f"--raise={kind}"]} for kind in names]
    cases.append({"module": PROBE, "argv": ["--raise=errno_ENOSPC", f"--model_dir={model_dir}"]})
    cases.append({"module": PROBE, "argv": ["--raise=broken_pipe"]})  # `command | head`
    *results, under_run, piped = run_batch(cases)
    assert piped["code"] == 141 and piped["stderr"] == "", piped  # quiet, as the shell's tools
    for kind, result in zip(names, results):
        if kind in kinds:
            code, text = kinds[kind]
            lines = result["stderr"].splitlines()
            assert result["code"] == code and len(lines) == 1, (kind, result)
            assert text in lines[0] and "Traceback" not in result["stderr"], (kind, lines)
            assert lines[0].startswith("error: ") or kind == "interrupt", (kind, lines)
        else:  # a bug: the interpreter's traceback and exit code 1, never dressed up as a user error
            assert result["code"] == 1, (kind, result)
            assert "Traceback" in result["stderr"] and bugs[kind] in result["stderr"], (kind, result)
            assert not result["stderr"].splitlines()[-1].startswith("error: "), (kind, result)
    assert under_run["code"] == 74 and len(under_run["stderr"].splitlines()) == 1, under_run
    assert (f"the last complete checkpoint is {model_dir}/checkpoints/ckpt-2 (rerun the same command "
            "to resume from it)") in under_run["stderr"], under_run


def test_flagfiles_that_are_not_utf8_text_or_not_files_are_one_line(tmp_path):
    latin1 = tmp_path / "latin1.flags"
    latin1.write_bytes(b"--learning_rate=0.1\n# caf\xe9\n")
    fifo = tmp_path / "fifo.flags"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.flags"
    os.symlink(loop, loop)
    for path, expected in ((latin1, "line 2: not UTF-8 text (byte 0xe9)"), (fifo, "not a regular file"),
                           (loop, "link loop"), (tmp_path, "not a regular file")):
        with pytest.raises(UsageError, match=r"--flagfile=.*") as caught:
            errors.check_flagfiles([f"--flagfile={path}"])
        assert expected in str(caught.value), caught.value


def test_an_argument_that_is_not_utf8_is_refused_naming_its_bytes():
    name = os.fsdecode(b"/runs/caf\xe9")  # a Latin-1 directory name, as Python hands it over
    with pytest.raises(UsageError, match=r"argument --model_dir=/runs/caf\\xe9 is not valid UTF-8"):
        errors.check_arguments_are_utf8(["--train_steps=2", f"--model_dir={name}"])
    errors.check_arguments_are_utf8(["--model_dir=/runs/café"])  # UTF-8 is fine


def test_a_model_dir_longer_than_path_max_creates_nothing(tmp_path):
    deep = str(tmp_path / "/".join(["d" * 200] * 21))  # > 4096 bytes
    with pytest.raises(UsageError, match="the path is .* bytes long"):
        rundir.ensure_writable_dir(deep, f"--model_dir={deep}")
    long_name = str(tmp_path / "run" / ("n" * 300))
    with pytest.raises(UsageError, match="a name in the path is 300 bytes long"):
        rundir.ensure_writable_dir(long_name, f"--model_dir={long_name}")
    assert os.listdir(tmp_path) == []  # not one of the parents that would have fitted


def _image_tree(root, images: int) -> None:
    """DIR/{train,val}/cat/*.png: `images` hard links of one tiny PNG per split (cheap to make)."""
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        folder = root / split / "cat"
        folder.mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "0.png")
        for i in range(1, images):
            os.link(folder / "0.png", folder / f"{i}.png")


def test_ctrl_c_in_evaluate_and_make_tfrecords_is_one_line_and_exit_130(tmp_path):
    """A real SIGINT in the middle of a conversion and of an evaluation; and a FIFO in an image
    tree is refused in one line (it blocked the file check, and Ctrl-C with it, forever)."""
    _image_tree(tmp_path / "images", 20000)
    fifo_tree = tmp_path / "fifo_tree"
    _image_tree(fifo_tree, 2)
    os.mkfifo(fifo_tree / "train" / "cat" / "blocked.png")
    run = str(tmp_path / "run")
    cases = [{"module": "convmixer_dist.main", "argv": [*TINY_RUN, f"--model_dir={run}"]},
             {"module": "convmixer_dist.commands.make_tfrecords", "timeout": 60,
              "argv": [f"--data_dir={fifo_tree}", f"--output={tmp_path / 'fifo_records'}", "--shards=1",
                       "--eval_shards=1"]},
             {"module": "convmixer_dist.commands.make_tfrecords", "interrupt_after": 1.0,
              "argv": [f"--data_dir={tmp_path / 'images'}", f"--output={tmp_path / 'records'}",
                       "--shards=2", "--eval_shards=2"]},
             {"module": "convmixer_dist.commands.evaluate", "interrupt_after": 4,  # a long test split
              "argv": [f"--model_dir={run}", "--synthetic_test_size=2000000"]}]
    trained, fifo, *interrupted = run_batch(cases)
    assert trained["code"] == 0, trained
    assert fifo["code"] == 2 and fifo["stderr"].splitlines() == [
        f"error: --data_dir: {fifo_tree}/train/cat/blocked.png is not a readable image file (a FIFO, "
        "socket or device); remove or rename it"], fifo
    for case, result in zip(cases[2:], interrupted):
        lines = [line for line in result["stderr"].split("\n") if line]  # a \r progress bar is one line
        assert "Traceback" not in result["stderr"], result
        assert result["code"] == 130 and result["stderr"].endswith("interrupted (Ctrl-C)\n"), result
        assert len(lines) == 1, result  # (make_tfrecords' \r progress bar may precede it on that line)
    records = tmp_path / "records"  # nothing half-written (when the interrupt came after the check)
    assert not records.exists() or not [n for n in os.listdir(records) if n.endswith(".tmp")]
