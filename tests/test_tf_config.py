"""TF_CONFIG validation for multi_worker: explicit checks that `python -O` keeps, and task types the
trainer does not run (a side-car evaluator) refused in one line."""
import ast
import json
import pathlib
import subprocess
import sys

import pytest

from convmixer_dist.errors import UsageError
from convmixer_dist.strategy import validate_tf_config
from helpers import ROOT

WORKERS = {"worker": ["localhost:1", "localhost:2"]}


@pytest.mark.parametrize("spec,message", [
    ({"cluster": WORKERS, "task": {"type": "worker", "index": 2}}, "malformed"),
    ({"cluster": WORKERS, "task": {"type": "chief", "index": 0}}, "malformed"),
    ({"cluster": WORKERS, "task": {"type": "worker"}}, "malformed"),
    ({"cluster": "x", "task": {"type": "worker", "index": 0}}, "malformed"),
    ({"cluster": {**WORKERS, "evaluator": ["localhost:3"]}, "task": {"type": "evaluator", "index": 0}},
     "task type 'evaluator' is not supported"),
    ({"cluster": {**WORKERS, "ps": ["localhost:3"]}, "task": {"type": "worker", "index": 0}},
     "task type 'ps' is not supported"),
])
def test_bad_tf_config_is_one_usage_error(spec, message):
    with pytest.raises(UsageError, match=message):
        validate_tf_config(json.dumps(spec))


def test_a_good_tf_config_passes():
    spec = {"cluster": WORKERS, "task": {"type": "worker", "index": 1}}
    assert validate_tf_config(json.dumps(spec)) == spec


def test_validation_survives_python_dash_O():
    spec = json.dumps({"cluster": WORKERS, "task": {"type": "worker", "index": 7}})
    code = ("import sys; from convmixer_dist.errors import UsageError; "
            "from convmixer_dist.strategy import validate_tf_config\n"
            f"try: validate_tf_config({spec!r})\n"
            "except UsageError as err: print(err); sys.exit(2)")
    result = subprocess.run([sys.executable, "-O", "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "TF_CONFIG is malformed" in result.stdout, result.stderr[-2000:]


def test_the_package_validates_without_assert():
    # `python -O` strips assert statements: none may guard anything in the product code.
    offenders = [f"{path.name}:{node.lineno}"
                 for path in sorted(pathlib.Path(ROOT, "convmixer_dist").rglob("*.py"))
                 for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assert)]
    assert offenders == []


@pytest.mark.parametrize("spec,message", [
    ({"cluster": {"worker": ["localhost", "localhost:2"]}, "task": {"type": "worker", "index": 0}},
     r"cluster.worker\[0\]: 'localhost' is not host:port"),
    ({"cluster": {"worker": ["localhost:0", "localhost:2"]}, "task": {"type": "worker", "index": 0}},
     "port in 1..65535"),
    ({"cluster": {"worker": ["localhost:65536", "localhost:2"]}, "task": {"type": "worker", "index": 0}},
     "port in 1..65535"),
    ({"cluster": {"worker": ["localhost:+80", "localhost:2"]}, "task": {"type": "worker", "index": 0}},
     "port in 1..65535"),
    ({"cluster": {"worker": ["local host:1", "localhost:2"]}, "task": {"type": "worker", "index": 0}},
     "is not host:port"),
    ({"cluster": {"worker": [":1", "localhost:2"]}, "task": {"type": "worker", "index": 0}}, "is not host:port"),
    ({"cluster": {"worker": [2222, "localhost:2"]}, "task": {"type": "worker", "index": 0}},
     r"cluster.worker\[0\]: 2222 is not a \"host:port\" string"),
    ({"cluster": {"worker": "localhost:1,localhost:2"}, "task": {"type": "worker", "index": 0}},
     "cluster.worker is not a list"),
    ({"cluster": {**WORKERS, "chief": ["localhost:3", "localhost:4"]}, "task": {"type": "worker", "index": 0}},
     "at most one chief"),
    ({"cluster": WORKERS, "task": {"type": "worker", "index": "1"}}, r"task.index \"1\" is not an integer"),
    ({"cluster": WORKERS, "task": {"type": "worker", "index": True}}, "task.index true is not an integer"),
    ({"cluster": WORKERS, "task": {"type": "worker", "index": 1.5}}, "task.index 1.5 is not an integer"),
    ({"cluster": WORKERS, "task": {"type": "worker", "index": -1}}, "task.index -1 is not an integer in 0..1"),
    ({"cluster": WORKERS, "task": {"type": ["worker"], "index": 0}}, "task.type"),
    ({"cluster": WORKERS, "task": "worker"}, "malformed"),
    ({"cluster": {"chief": ["localhost:1"]}, "task": {"type": "chief", "index": 0}}, "malformed"),
    ({"cluster": {"worker": ["localhost:1", "localhost:1"]}, "task": {"type": "worker", "index": 0}},
     "the same host:port"),
    ([1, 2], "malformed"),
])
def test_tf_config_values_are_checked_strictly(spec, message):
    with pytest.raises(UsageError, match=message) as err:
        validate_tf_config(json.dumps(spec))
    assert str(err.value).startswith("TF_CONFIG ") and "\n" not in str(err.value)


@pytest.mark.parametrize("address", ["localhost:1", "10.0.0.7:65535", "[::1]:2222", "node-1.cluster_a:80"])
def test_good_addresses_pass(address):
    spec = {"cluster": {"worker": [address, "other:2"]}, "task": {"type": "worker", "index": 0}}
    assert validate_tf_config(json.dumps(spec)) == spec


def test_a_worker_address_without_a_port_is_one_error_line_exit_2(tmp_path):
    from helpers import make_tf_config, run_cli

    result = run_cli("convmixer_dist.main", "--flagfile=configs/quickstart.flags", "--train_steps=2",
                     "--strategy=multi_worker", f"--model_dir={tmp_path / 'run'}",
                     env={"TF_CONFIG": make_tf_config(["localhost", "localhost:2"], 0)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: TF_CONFIG cluster.worker[0]: 'localhost' is not host:port with a port in 1..65535"]
    assert not (tmp_path / "run").exists()
