"""The package's shape (WORKSPACE.md "Layout"): the library never imports the user commands or the
performance tools, data and model code never import training, only flags.py reads absl's FLAGS,
every command has the one entry shape, the dataset kind is looked up only in the registry of data
sources, no function grows past 80 lines and no file past 450."""
from __future__ import annotations

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "convmixer_dist")


def _modules(pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.join(PACKAGE, pattern), recursive=True))


def _imported(path: str) -> set[str]:
    """Every module name imported by the file (`from a import b` counts a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_never_imports_commands_or_perf():
    for path in _modules("*.py") + _modules("data/*.py") + _modules("data/sources/*.py") + _modules("training/*.py"):
        bad = {name for name in _imported(path)
               if name.startswith(("convmixer_dist.commands", "convmixer_dist.perf"))}
        assert not bad, f"{os.path.relpath(path, ROOT)} imports {sorted(bad)}"


def test_only_the_flags_module_reads_FLAGS():
    for path in _modules("**/*.py") + _modules("*.py"):
        if path.endswith(os.path.join("convmixer_dist", "flags.py")):
            continue
        tree = ast.parse(open(path).read())
        reads = [node.lineno for node in ast.walk(tree)
                 if isinstance(node, (ast.Name, ast.Attribute))
                 and (node.id if isinstance(node, ast.Name) else node.attr) == "FLAGS"]
        assert not reads, f"{os.path.relpath(path, ROOT)}:{reads[0]} reads FLAGS"


def test_every_command_enters_through_run_command():
    commands = _modules("main.py") + _modules("commands/*.py") + _modules("perf/*.py")
    for path in commands:
        text = open(path).read()
        if '__name__ == "__main__"' in text:
            main_block = text.split('if __name__ == "__main__":', 1)[1]
            assert "cli.run_command(main" in main_block and "app.run(" not in text, path


def test_no_function_is_longer_than_80_lines():
    for path in _modules("**/*.py") + _modules("*.py"):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} has {length} lines"


# Which parts may import which: the modules of a part never import the parts listed.
DATA = ["data/*.py", "data/sources/*.py"]
MODEL = ["model.py", "fused.py", "presets.py"]
NEVER_IMPORTS = [
    (DATA, ("convmixer_dist.training", "convmixer_dist.commands", "convmixer_dist.perf")),
    (MODEL, ("convmixer_dist.training", "convmixer_dist.commands", "convmixer_dist.perf")),
    (["training/*.py"], ("convmixer_dist.commands", "convmixer_dist.perf")),
]


def test_data_and_model_never_import_training_and_training_never_imports_commands_or_perf():
    for patterns, forbidden in NEVER_IMPORTS:
        paths = [path for pattern in patterns for path in _modules(pattern)]
        assert paths, patterns
        for path in paths:
            bad = {name for name in _imported(path) if name.startswith(forbidden)}
            assert not bad, f"{os.path.relpath(path, ROOT)} imports {sorted(bad)}"


# The dataset kind is looked up in one place, the registry of data sources (`data/registry.py`, a
# dictionary): no module compares `<something>.dataset` (each source module holds its dataset's facts).
def _dataset_comparisons(path: str) -> int:
    return sum(1 for node in ast.walk(ast.parse(open(path).read())) if isinstance(node, ast.Compare)
               for side in [node.left, *node.comparators]
               if isinstance(side, ast.Attribute) and side.attr == "dataset")


def test_the_dataset_kind_is_compared_nowhere_and_every_dataset_has_a_source():
    from convmixer_dist.config import DATASETS
    from convmixer_dist.data.registry import SOURCES

    for path in _modules("**/*.py"):
        count = _dataset_comparisons(path)
        assert not count, (f"{os.path.relpath(path, PACKAGE)} compares the dataset kind {count} times; "
                           "look the dataset's facts up in its source (data/registry.py) instead")
    assert set(SOURCES) == set(DATASETS)


def test_describing_a_dataset_and_resolving_flags_import_no_tensorflow():
    """flags.resolve and commands/saved_run.py describe the dataset before TensorFlow starts."""
    import subprocess
    import sys

    code = ("import sys; from convmixer_dist import flags; from convmixer_dist.commands import saved_run; "
            "from convmixer_dist.data import registry; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# Files still over the limit, to be split; they may not grow past this.
LONG_FILES = {"perf/benchmark.py": 550}
MAX_FILE_LINES = 450


def test_no_file_in_the_package_is_longer_than_450_lines():
    for path in _modules("**/*.py") + _modules("*.py"):
        name = os.path.relpath(path, PACKAGE)
        lines = len(open(path).readlines())
        limit = LONG_FILES.get(name, MAX_FILE_LINES)
        assert lines <= limit, f"{name} has {lines} lines (at most {limit}): split it by concern"
