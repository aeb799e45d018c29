"""The package's shape (WORKSPACE.md "Layout"): the library never imports the user commands or the
performance tools, only flags.py reads absl's FLAGS, every command has the one entry shape, and no
function grows past 80 lines."""
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
    for path in _modules("*.py") + _modules("training/*.py"):
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
