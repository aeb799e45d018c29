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
