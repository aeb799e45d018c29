"""Every input a user can get wrong: exit code 2, exactly one line on stderr naming the flag or file,
no traceback, and nothing written."""
import json
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest

from cifar_files import write_cifar10
from helpers import run_cli

TINY = ["--hidden_dim=16", "--depth=1", "--kernel_size=3", "--patch_size=2", "--image_size=8",
        "--global_batch_size=32", "--train_steps=2", "--steps_per_loop=2",
        "--synthetic_train_size=64", "--synthetic_test_size=32"]


def corrupt_cifar(tmp):
    folder = write_cifar10(str(tmp / "data"), train_sizes=(8, 8), test_size=4)
    with open(os.path.join(folder, "data_batch_2"), "wb") as f:
        f.write(b"\x80\x04garbage")
    return ["--dataset=cifar10", f"--data_dir={tmp / 'data'}", "--image_size=32"], {}


def crafted_pickle(tmp):
    folder = write_cifar10(str(tmp / "data"), train_sizes=(8,), test_size=4)

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp / 'data' / 'payload_ran'}",)

    with open(os.path.join(folder, "data_batch_1"), "wb") as f:
        pickle.dump({b"data": b"", b"labels": [], b"x": Payload()}, f)
    return ["--dataset=cifar10", f"--data_dir={tmp / 'data'}", "--image_size=32"], {}


def flagfiles(**files):
    """Write flagfiles NAME -> lines into tmp; use the first one."""
    def build(tmp):
        for name, lines in files.items():
            (tmp / name).write_text("\n".join(line.replace("TMP", str(tmp)) for line in lines) + "\n")
        return [f"--flagfile={tmp / next(iter(files))}"], {}
    return build


_HELD = []  # sockets kept open while the command runs


def taken_port(tmp):
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    sock.listen()
    _HELD.append(sock)
    return [f"--profiler_port={sock.getsockname()[1]}"], {}


def truncated_png(tmp):
    from PIL import Image

    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp / "images" / split / label).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp / "images" / split / label / f"{i}.png")
    path = tmp / "images" / "train" / "b" / "1.png"
    path.write_bytes(path.read_bytes()[:60])
    return ["--dataset=image_folder", f"--data_dir={tmp / 'images'}", "--global_batch_size=4",
            "--synthetic_train_size=4"], {}


def cifar100_labels_as_cifar10(tmp):
    folder = write_cifar10(str(tmp / "data"), train_sizes=(8,), test_size=4)
    with open(os.path.join(folder, "data_batch_1"), "wb") as f:  # labels 0..99 in a CIFAR-10 file
        pickle.dump({b"data": np.zeros((8, 3072), np.uint8), b"labels": [0, 5, 99, 42, 7, 1, 2, 3]}, f)
    return ["--dataset=cifar10", f"--data_dir={tmp / 'data'}", "--image_size=32"], {}


def run_dir_in_use(tmp):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    _HELD.append(other)
    (tmp / "run").mkdir()
    (tmp / "run" / ".lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                   "since": "now"}))
    return [], {}


@pytest.fixture(autouse=True, scope="module")
def _release_held():
    yield
    for held in _HELD:
        if isinstance(held, subprocess.Popen):
            held.kill()
            held.wait()
        else:
            held.close()


def _tfrecord_dir(tmp, train_records):
    """DIR with train-00000-of-00001 (given serialized records, or raw bytes) and one validation shard."""
    import tensorflow as tf

    folder = tmp / "records"
    folder.mkdir()
    if isinstance(train_records, bytes):
        (folder / "train-00000-of-00001").write_bytes(train_records)
    else:
        with tf.io.TFRecordWriter(str(folder / "train-00000-of-00001")) as writer:
            for record in train_records:
                writer.write(record)
    (folder / "validation-00000-of-00001").write_bytes((folder / "train-00000-of-00001").read_bytes())
    return ["--dataset=tfrecord", f"--data_dir={folder}", "--num_classes=3", "--global_batch_size=2"], {}


def tfrecord_without_shards(tmp):
    (tmp / "records").mkdir()
    return ["--dataset=tfrecord", f"--data_dir={tmp / 'records'}", "--num_classes=3"], {}


def tfrecord_corrupt(tmp):
    return _tfrecord_dir(tmp, b"\x10\x00\x00\x00\x00\x00\x00\x00not a tfrecord at all, just bytes")


def tfrecord_wrong_keys(tmp):
    import tensorflow as tf

    example = tf.train.Example(features=tf.train.Features(feature={
        "image/raw": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"\xff\xd8\xff"])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))}))
    return _tfrecord_dir(tmp, [example.SerializeToString()] * 4)


def empty_cifar(tmp):
    (tmp / "empty").mkdir()
    return ["--dataset=cifar10", f"--data_dir={tmp / 'empty'}", "--image_size=32"], {}


def tf_config(value):
    return lambda tmp: (["--strategy=multi_worker"], {"TF_CONFIG": value})


def model_dir_under_a_file(tmp):
    (tmp / "a_file").write_text("x")
    return [f"--model_dir={tmp / 'a_file' / 'run'}"], {}


CASES = {
    "unknown strategy": (lambda tmp: (["--strategy=bogus"], {}), "--strategy"),
    "unknown model": (lambda tmp: (["--model=convmixer_9_9"], {}), "--model"),
    "unknown dataset": (lambda tmp: (["--dataset=imagenet21k"], {}), "--dataset"),
    "unknown precision": (lambda tmp: (["--precision=fp8"], {}), "--precision"),
    "unknown flag": (lambda tmp: (["--hiden_dim=3"], {}), "hiden_dim"),
    "zero hidden_dim": (lambda tmp: (["--hidden_dim=0"], {}), "--hidden_dim"),
    "negative depth": (lambda tmp: (["--depth=-1"], {}), "--depth"),
    "zero batch": (lambda tmp: (["--global_batch_size=0"], {}), "--global_batch_size"),
    "negative learning rate": (lambda tmp: (["--learning_rate=-1"], {}), "--learning_rate"),
    "dropout above 1": (lambda tmp: (["--dropout_rate=1.5"], {}), "--dropout_rate"),
    "patch does not divide image": (lambda tmp: (["--image_size=30", "--patch_size=4"], {}), "--patch_size"),
    "kernel larger than patch grid": (lambda tmp: (["--kernel_size=9"], {}), "--kernel_size"),
    "batch not divisible by replicas": (
        lambda tmp: (["--strategy=mirrored", "--cpu_replicas=2", "--global_batch_size=33"], {}),
        "--global_batch_size=33"),
    "missing data dir": (lambda tmp: (["--dataset=cifar10", "--data_dir=/nonexistent/cifar"], {}),
                         "--data_dir"),
    "data dir without cifar files": (empty_cifar, "--data_dir"),
    "corrupt data file": (corrupt_cifar, "data_batch_2"),
    "crafted pickle (payload must not run)": (crafted_pickle, "data_batch_1"),
    "NaN learning rate": (lambda tmp: (["--learning_rate=nan"], {}), "--learning_rate=nan"),
    "infinite weight decay": (lambda tmp: (["--weight_decay=inf"], {}), "--weight_decay=inf"),
    "absurd learning rate": (lambda tmp: (["--learning_rate=1e308"], {}), "--learning_rate"),
    "negative epochs beside train_steps": (lambda tmp: (["--epochs=-3"], {}), "--epochs=-3"),
    "TF_CONFIG missing": (tf_config(None), "TF_CONFIG"),
    "TF_CONFIG malformed": (tf_config("{not json"), "TF_CONFIG"),
    "TF_CONFIG with one worker": (
        tf_config(json.dumps({"cluster": {"worker": ["localhost:2222"]},
                              "task": {"type": "worker", "index": 0}})), "at least 2"),
    "unwritable model_dir": (model_dir_under_a_file, "--model_dir"),
    "early stopping without validation": (lambda tmp: (["--early_stopping_patience=3"], {}),
                                          "--validation_fraction"),
    "crop_scale without rrc": (lambda tmp: (["--crop_scale=0.5"], {}), "--crop_scale"),
    "tfrecord without shards": (tfrecord_without_shards, "no train-* TFRecord shards"),
    "tfrecord corrupt record": (tfrecord_corrupt, "corrupt TFRecord file"),
    "tfrecord wrong feature keys": (tfrecord_wrong_keys, "lack image/encoded"),
    "malformed crop_ratio": (lambda tmp: (["--augment=rrc", "--crop_ratio=4/3"], {}), "--crop_ratio"),
    "eval_crop_fraction above 1": (lambda tmp: (["--eval_crop_fraction=1.5"], {}), "--eval_crop_fraction"),
    "batch not divisible by grad_accum_steps": (lambda tmp: (["--grad_accum_steps=5"], {}),
                                                "--grad_accum_steps=5"),
    "malformed profile_steps": (lambda tmp: (["--profile_steps=20,10"], {}), "--profile_steps"),
    "missing flagfile": (lambda tmp: (["--flagfile=configs/nope.flags"], {}), "nope.flags"),
    "flagfile including itself": (flagfiles(a=["--depth=2", "--flagfile=TMP/a"]), "circular"),
    "flagfiles a -> b -> a": (flagfiles(a=["--flagfile=TMP/b"], b=["--depth=2", "--flagfile=TMP/a"]),
                              "circular flagfile includes"),
    "flagfile line without --": (flagfiles(a=["--depth=2", "learning_rate=0.5"]),
                                 "line 2: 'learning_rate=0.5' is not a flag"),
    "stray positional argument": (lambda tmp: (["learning_rate=0.5"], {}),
                                  "unexpected argument 'learning_rate=0.5'"),
    "profiler port taken": (taken_port, "--profiler_port"),
    "profile window after the run": (lambda tmp: (["--profile_steps=100,200"], {}), "--profile_steps=100,200"),
    "truncated PNG in an image folder": (truncated_png, "1.png: truncated"),
    "CIFAR-100 labels under --dataset=cifar10": (cifar100_labels_as_cifar10, "outside 0..9"),
    "TF_CONFIG with an evaluator task": (
        tf_config(json.dumps({"cluster": {"worker": ["localhost:2222", "localhost:2223"],
                                          "evaluator": ["localhost:2224"]},
                              "task": {"type": "evaluator", "index": 0}})), "'evaluator'"),
    "run directory in use": (run_dir_in_use, "is in use by pid"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(tmp_path, case):
    build, named = CASES[case]
    args, env = build(tmp_path)
    env.setdefault("TF_CONFIG", None)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = run_cli("convmixer_dist.main", f"--model_dir={tmp_path / 'run'}", *TINY, *args, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and named in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written
