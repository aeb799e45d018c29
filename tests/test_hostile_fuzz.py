"""Hostile inputs, generated: for each command, random bytes and encodings in flagfiles and in file
and directory names, every file format the project reads or resumes from truncated at a random
offset (or emptied), link loops, dangling links and FIFOs in data trees, a read-only run directory.
The contract: an exit code in the documented set, no traceback, at most one `error:` line and three
lines on stderr, no temporary file left behind, and no checkpoint that was intact changed or lost.

Seeded: FUZZ_SEED=N replays a run (the seed is in every failure message; default: a new one each
run). All cases run in two processes (tests/command_driver.py forks one child per case after
importing TensorFlow once), so the whole test takes about a minute.
"""
import glob
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

from helpers import ROOT

SEED = int(os.environ.get("FUZZ_SEED") or random.SystemRandom().randrange(2 ** 32))
EXIT_CODES = {0, 2, 74}  # done, bad input or environment, disk full (3 diverged, 75/130 signals: not here)
TINY = ["--dataset=synthetic", "--synthetic_train_size=64", "--synthetic_test_size=32", "--hidden_dim=16",
        "--depth=2", "--kernel_size=3", "--patch_size=2", "--image_size=8", "--num_classes=4",
        "--global_batch_size=16", "--steps_per_loop=2", "--checkpoint_every_steps=2", "--keep_checkpoints=5"]
COMMANDS = ["convmixer_dist.main", "convmixer_dist.commands.evaluate", "convmixer_dist.commands.export",
            "convmixer_dist.commands.predict", "convmixer_dist.commands.plot",
            "convmixer_dist.commands.make_tfrecords", "convmixer_dist.perf.profile_report",
            "convmixer_dist.perf.benchmark", "convmixer_dist.perf.kernel_bench",
            "convmixer_dist.perf.imagenet_like", "convmixer_dist.perf.augment_benchmark",
            "convmixer_dist.perf.scaling"]


def run_batch(cases: list[dict]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, os.path.join(ROOT, "tests", "command_driver.py")]
    if os.geteuid() == 0:  # a private mount namespace: read-only bind mounts vanish with it
        command = ["unshare", "-m", *command]
    proc = subprocess.run(command, input=json.dumps(cases), capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, f"FUZZ_SEED={SEED}: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def random_bytes(rng: random.Random, n: int) -> bytes:
    """Bytes that are rarely UTF-8: high bytes, NUL, controls, broken multi-byte sequences."""
    pool = [b"\xff", b"\xfe", b"\xc3", b"\xe9", b"\x80", b"\x00", b"\r", b"\t", b"\x1b", b"\xed\xa0\x80",
            b"caf\xc3\xa9", b"\xf0\x9f\x98", b"a", b"-", b"=", b"/", b" "]
    return b"".join(rng.choice(pool) for _ in range(n))


def random_name(rng: random.Random) -> str:
    """A file name of random bytes (no '/' or NUL), as Python hands it over: surrogate-escaped."""
    raw = random_bytes(rng, rng.randint(1, 12)).replace(b"/", b"_").replace(b"\x00", b"_") or b"x"
    return os.fsdecode(b"n" + raw)


def truncate(path: str, rng: random.Random) -> int:
    """Cut `path` at a random offset (0: emptied); returns the new size."""
    size = os.path.getsize(path)
    offset = rng.choice([0, rng.randrange(max(size, 1))]) if size else 0
    with open(path, "r+b") as f:
        f.truncate(offset)
    return offset


def checkpoint_digests(model_dir: str) -> dict[str, str]:
    return {os.path.relpath(p, model_dir): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in glob.glob(os.path.join(glob.escape(model_dir), "checkpoints", "*ckpt-*"))
            if os.path.isfile(p)}


def build_base(tmp) -> dict:
    """A trained run (checkpoints 2 and 4, a profile, events), its export, an image tree and its
    TFRecord shards: the material every case damages a fresh copy of."""
    run, tree, records, export = (str(tmp / n) for n in ("base_run", "base_tree", "base_records", "export"))
    import numpy as np
    from PIL import Image
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            os.makedirs(os.path.join(tree, split, cls))
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
                    os.path.join(tree, split, cls, f"{i}.png"))
    cases = [{"module": "convmixer_dist.main", "argv": [*TINY, "--train_steps=4", "--profile_steps=3,4",
                                                        f"--model_dir={run}"]},
             {"module": "convmixer_dist.commands.export", "argv": [f"--model_dir={run}", f"--output={export}"]},
             {"module": "convmixer_dist.commands.make_tfrecords",
              "argv": [f"--data_dir={tree}", f"--output={records}", "--shards=2", "--eval_shards=1"]}]
    for case, result in zip(cases, run_batch(cases)):
        assert result["code"] == 0, (case, result)
    xplane = glob.glob(os.path.join(run, "plugins", "profile", "*", "*.xplane.pb"))
    events = glob.glob(os.path.join(run, "train", "events.out.tfevents.*"))
    assert xplane and events, os.listdir(run)
    return {"run": run, "tree": tree, "records": records, "export": export}


def generate(tmp, base: dict, rng: random.Random) -> list[dict]:
    """The hostile cases: {"module", "argv", "what", "run" (a model dir whose checkpoints to watch)}."""
    cases = []
    counter = iter(range(10 ** 6))

    def copy(src: str) -> str:
        dst = str(tmp / f"case{next(counter)}")
        shutil.copytree(src, dst, symlinks=True)
        return dst

    def add(module: str, argv: list[str], what: str, run: str | None = None, damaged=()) -> None:
        watched = {k: v for k, v in checkpoint_digests(run).items()
                   if not any(k.startswith(d) for d in damaged)} if run else {}
        cases.append({"module": module, "argv": argv, "what": what, "run": run, "watched": watched,
                      "timeout": 120})

    # 1. Flagfiles of random bytes (and valid lines around them), for every command.
    for module in COMMANDS:
        path = str(tmp / f"flags{next(counter)}.flags")
        lines = [b"--train_steps=2", random_bytes(rng, rng.randint(1, 30)), b"--" + random_bytes(rng, 8)]
        rng.shuffle(lines)
        with open(path, "wb") as f:
            f.write(b"\n".join(lines) + rng.choice([b"", b"\n", b"\r\n"]))
        add(module, [f"--flagfile={path}"], f"flagfile of random bytes {open(path, 'rb').read()[:80]!r}")
    # 2. Names of random bytes: a run directory, an output, an image tree's class folder.
    named = copy(base["run"])
    strange = os.path.join(os.path.dirname(named), random_name(rng))
    os.rename(named, strange)
    add("convmixer_dist.commands.plot", [f"--model_dir={strange}"], f"run named {strange!r}", strange)
    add("convmixer_dist.commands.evaluate", [f"--model_dir={strange}"], f"run named {strange!r}", strange)
    add("convmixer_dist.main", [*TINY, "--train_steps=4", f"--model_dir={strange}"], "resume, odd name", strange)
    add("convmixer_dist.commands.evaluate", [f"--model_dir={tmp / random_name(rng)}"], "missing odd name")
    tree = copy(base["tree"])
    os.rename(os.path.join(tree, "train", "cat"), os.path.join(tree, "train", random_name(rng)))
    add("convmixer_dist.commands.make_tfrecords", [f"--data_dir={tree}", f"--output={tree}_out", "--shards=1",
                                                    "--eval_shards=1"], "class folder of random bytes")
    # 3. Every format the project reads or resumes from, truncated at a random offset.
    for name, module in (("flags.txt", "convmixer_dist.commands.evaluate"),
                         ("checkpoints/identity.json", "convmixer_dist.main"),
                         ("checkpoints/checkpoint", "convmixer_dist.commands.evaluate"),
                         ("checkpoints/ckpt-4.index", "convmixer_dist.main"),
                         ("checkpoints/ckpt-4.data-00000-of-00001", "convmixer_dist.main"),
                         ("summary.json", "convmixer_dist.main")):
        run = copy(base["run"])
        cut = truncate(os.path.join(run, name), rng)
        argv = [*TINY, "--train_steps=6", f"--model_dir={run}"] if module.endswith("main") else [
            f"--model_dir={run}"]
        add(module, argv, f"{name} truncated at {cut}", run, damaged=(name,))
    run = copy(base["run"])
    with open(os.path.join(run, ".lock"), "wb") as f:
        f.write(b'{"pid": 12345, "host": "' + random_bytes(rng, 6))
    add("convmixer_dist.main", [*TINY, "--train_steps=6", f"--model_dir={run}"], ".lock truncated", run)
    run = copy(base["run"])
    event = glob.glob(os.path.join(run, "train", "events.out.tfevents.*"))[0]
    cut = truncate(event, rng)
    add("convmixer_dist.commands.plot", [f"--model_dir={run}"], f"event file truncated at {cut}", run)
    run = copy(base["run"])
    xplane = glob.glob(os.path.join(run, "plugins", "profile", "*", "*.xplane.pb"))[0]
    cut = truncate(xplane, rng)
    add("convmixer_dist.perf.profile_report", [run], f"profile truncated at {cut}", run)
    if cut == 0:  # an empty profile is no profile: an error, not a report of zeros
        cases[-1]["codes"] = [2]
    records = copy(base["records"])
    shard = rng.choice(sorted(glob.glob(os.path.join(records, "train-*"))))
    cut = truncate(shard, rng)
    add("convmixer_dist.main", ["--dataset=tfrecord", f"--data_dir={records}", "--image_size=8", "--hidden_dim=16",
                                "--depth=2", "--kernel_size=3", "--patch_size=2", "--global_batch_size=4",
                                "--train_steps=2", f"--model_dir={tmp / 'tfrecord_run'}"],
        f"{os.path.basename(shard)} truncated at {cut}")
    tree = copy(base["tree"])
    image = rng.choice(sorted(glob.glob(os.path.join(tree, "*", "*", "*.png"))))
    cut = truncate(image, rng)
    add("convmixer_dist.commands.make_tfrecords", [f"--data_dir={tree}", f"--output={tree}_out", "--shards=1",
                                                    "--eval_shards=1"], f"image truncated at {cut}")
    add("convmixer_dist.commands.predict", [f"--model={base['export']}", image], f"image truncated at {cut}")
    # 4. Links that loop or point nowhere, FIFOs: in data trees, as images, as the run directory.
    for kind in ("loop", "dangling", "fifo"):
        tree = copy(base["tree"])
        place = os.path.join(tree, rng.choice(["train", "val"]), rng.choice(["cat", "dog"]), f"odd.{kind}.png")
        if kind == "loop":
            os.symlink(place, place)
        elif kind == "dangling":
            os.symlink(os.path.join(tree, "nowhere.png"), place)
        else:
            os.mkfifo(place)
        add("convmixer_dist.commands.make_tfrecords", [f"--data_dir={tree}", f"--output={tree}_out",
                                                        "--shards=1", "--eval_shards=1"], f"{kind} in a data tree")
        add("convmixer_dist.commands.predict", [f"--model={base['export']}", place], f"{kind} as an image")
    loop = str(tmp / "looping_run")
    os.symlink(loop, loop)
    add("convmixer_dist.main", [*TINY, "--train_steps=2", f"--model_dir={loop}/run"], "model_dir in a link loop")
    add("convmixer_dist.commands.evaluate", [f"--model_dir={loop}"], "model_dir a link loop")
    # 5. A read-only run directory (a bind mount in the driver's own mount namespace, as root).
    if os.geteuid() == 0:
        run = copy(base["run"])
        cases.append({"shell": f"mount --bind {run} {run} && mount -o remount,ro,bind {run}"})
        add("convmixer_dist.commands.evaluate", [f"--model_dir={run}"], "read-only run", run)
        add("convmixer_dist.main", [*TINY, "--train_steps=6", f"--model_dir={run}"], "read-only resume", run)
    return cases


def check(case: dict, result: dict) -> list[str]:
    """The contract; returns what was broken."""
    broken = []
    stderr = result["stderr"]
    lines = [line for line in stderr.split("\n") if line.strip()]  # a \r progress bar is one line
    if result["code"] not in case.get("codes", EXIT_CODES):
        broken.append(f"exit code {result['code']}")
    if "Traceback" in stderr:
        broken.append("a traceback")
    if sum(line.startswith("error:") for line in lines) > 1 or len(lines) > 3:
        broken.append(f"{len(lines)} lines on stderr")
    for place in filter(None, [case.get("run")] + [a.split("=", 1)[1] for a in case["argv"]
                                                     if a.startswith("--output=")]):
        if os.path.isdir(place):
            leftovers = [p for p in glob.glob(os.path.join(glob.escape(place), "**", "*.tmp"), recursive=True)
                         + glob.glob(os.path.join(glob.escape(place), "**", ".*.tmp"), recursive=True)]
            if leftovers:
                broken.append(f"half-written files left: {leftovers[:3]}")
    if case.get("run"):
        now = checkpoint_digests(case["run"])
        changed = [name for name, digest in case["watched"].items()  # set aside as unusable-*: kept
                   if digest not in (now.get(name), now.get(name.replace("ckpt-", "unusable-ckpt-", 1)))]
        if changed:
            broken.append(f"intact checkpoint files changed or lost: {changed}")
    return broken


def test_hostile_inputs_keep_the_error_promise(tmp_path):
    rng = random.Random(SEED)
    base = build_base(tmp_path)
    cases = generate(tmp_path, base, rng)
    results = run_batch(cases)
    failures = []
    for case, result in zip(cases, results):
        if "shell" in case:
            assert result["code"] == 0, (case, result)
            continue
        broken = check(case, result)
        if broken:
            failures.append(f"{case['module']} {case['what']}: {'; '.join(broken)}\n"
                            f"    argv {case['argv']}\n    stderr {result['stderr'][-1500:]!r}")
    assert not failures, f"FUZZ_SEED={SEED} replays these ({len(failures)} of {len(cases)} cases):\n" + \
        "\n".join(failures)
