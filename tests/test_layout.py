"""The package's shape (WORKSPACE.md "Layout"): the library never imports the user commands or the
performance tools, data and model code never import training, only flags.py reads absl's FLAGS,
every command has the one entry shape, `config.dataset` is compared in a shrinking set of modules,
no function grows past 80 lines and no file past 450."""
from __future__ import annotations

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "convmixer_dist")


def _modules(pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.join(PACKAGE, pattern)))


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
    for path in _modules("*.py") + _modules("data/*.py") + _modules("training/*.py"):
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
DATA = ["data/*.py"]
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


# Where the dataset kind is still a string switch (comparisons of `<something>.dataset`), at most
# this many times per module. The goal is one place (a registry of data sources): lower a count when
# a comparison goes, and no other module may start comparing.
DATASET_SWITCHES = {"data/pipeline.py": 9, "flags.py": 4, "config.py": 3, "training/inputs.py": 3,
                    "commands/evaluate.py": 1, "commands/export.py": 1, "commands/saved_run.py": 2,
                    "perf/benchmark.py": 3}


def _dataset_comparisons(path: str) -> int:
    return sum(1 for node in ast.walk(ast.parse(open(path).read())) if isinstance(node, ast.Compare)
               for side in [node.left, *node.comparators]
               if isinstance(side, ast.Attribute) and side.attr == "dataset")


def test_the_dataset_kind_is_compared_only_where_it_still_is_and_no_more_often():
    for path in _modules("**/*.py") + _modules("*.py"):
        name = os.path.relpath(path, PACKAGE)
        count = _dataset_comparisons(path)
        assert count <= DATASET_SWITCHES.get(name, 0), (
            f"{name} compares the dataset kind {count} times (allowed: {DATASET_SWITCHES.get(name, 0)}); "
            "look the dataset's facts up where they are declared instead")


# Files still over the limit, to be split; they may not grow past this.
LONG_FILES = {"data/pipeline.py": 550, "data/augment.py": 550, "perf/benchmark.py": 550}
MAX_FILE_LINES = 450


def test_no_file_in_the_package_is_longer_than_450_lines():
    for path in _modules("**/*.py") + _modules("*.py"):
        name = os.path.relpath(path, PACKAGE)
        lines = len(open(path).readlines())
        limit = LONG_FILES.get(name, MAX_FILE_LINES)
        assert lines <= limit, f"{name} has {lines} lines (at most {limit}): split it by concern"
