"""Run many command lines cheaply: TensorFlow, Keras and the commands are imported once, then every
case runs in a forked child, a fresh copy of that process (its own FLAGS, TensorFlow's runtime not
started yet), exactly as `python -m MODULE ARGS...` would run it: same entry point, exit code and
output. Importing TensorFlow costs ~5 s per process; a fork costs milliseconds.

    python tests/command_driver.py < cases.json > results.json
    cases: [{"module": "convmixer_dist.main", "argv": [...], "cwd": DIR, "env": {...}, "timeout": S,
             "interrupt_after": S (send SIGINT then)}, or {"shell": "a step between commands"}]
    results: [{"code": int, "stdout": str, "stderr": str}]  (code -N: killed by signal N)
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(case: dict, out_path: str, err_path: str) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err, open(os.devnull, "rb") as null:
            os.dup2(null.fileno(), 0)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
        signal.alarm(int(case.get("timeout", 120)))  # A case that hangs (a FIFO) dies of SIGALRM.
        os.chdir(case.get("cwd") or ROOT)
        for key, value in (case.get("env") or {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        sys.argv = [case["module"], *case["argv"]]
        runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # What the interpreter would print for an uncaught exception.
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_cases(cases: list[dict]) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="driver_") as tmp:
        out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        for case in cases:
            if "shell" in case:  # a step between commands (fill a disk, damage a file)
                proc = subprocess.run(case["shell"], shell=True, capture_output=True, text=True)
                results.append({"code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr})
                continue
            pid = os.fork()
            if pid == 0:
                _child(case, out_path, err_path)
            if case.get("interrupt_after"):  # a real Ctrl-C: SIGINT after that many seconds
                deadline = time.monotonic() + float(case["interrupt_after"])
                while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
                    time.sleep(0.05)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGINT)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            with open(out_path, "rb") as out, open(err_path, "rb") as err:
                results.append({"code": code, "stdout": out.read().decode("utf-8", "replace"),
                                "stderr": err.read().decode("utf-8", "replace")})
    return results


def main() -> None:
    cases = json.load(sys.stdin)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # tests' own probe commands too
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")  # pre-imported below
    from convmixer_dist.runtime import quiet_tensorflow_import
    quiet_tensorflow_import()  # TensorFlow's Python side only: no op runs, its runtime starts in a child
    import keras  # noqa: F401
    for module in sorted({case["module"] for case in cases if "module" in case}):
        importlib.import_module(module)
    json.dump(run_cases(cases), sys.stdout)


if __name__ == "__main__":
    main()
