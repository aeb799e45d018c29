"""Every module imported under convmixer_dist/ or tests/ comes from the standard library, the
project, or a distribution listed in requirements.txt / requirements-test.txt.

A fresh machine has only what those files install: an import satisfied by a package that happens to
be on the developer's machine (or that arrives only as some other package's dependency) would make
the README's commands fail there, so it fails here.
"""
import ast
import importlib.metadata
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("convmixer_dist", "tests")


def _requirement_names(path: pathlib.Path) -> set[str]:
    """Normalised distribution names listed in a requirements file (following `-r` includes)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r"):
            names |= _requirement_names(path.parent / line[2:].strip())
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        assert match, f"{path.name}: cannot read the requirement line {line!r}"
        names.add(_normalise(match.group(0)))
    return names


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project_modules() -> set[str]:
    """Top-level names that resolve inside the repository (the package and tests' own helpers)."""
    names = {"convmixer_dist"}
    names |= {p.stem for p in (ROOT / "tests").glob("*.py")}
    return names


def imported_top_level_modules() -> dict[str, list[str]]:
    """Top-level module name -> files that import it (absolute imports only)."""
    found: dict[str, list[str]] = {}
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    found.setdefault(module.split(".")[0], []).append(str(path.relative_to(ROOT)))
    return found


def uncovered_imports(found: dict[str, list[str]], listed: set[str]) -> list[str]:
    """The imports in `found` that neither the standard library, the project nor `listed` covers."""
    providers = importlib.metadata.packages_distributions()
    project = _project_modules()
    missing = []
    for module, files in sorted(found.items()):
        if module in sys.stdlib_module_names or module in project:
            continue
        distributions = {_normalise(d) for d in providers.get(module, [])}
        if not distributions & listed:
            why = f"provided by {sorted(distributions)}" if distributions else "not installed"
            missing.append(f"{module} ({why}; imported in {files[0]})")
    return missing


def test_every_import_is_stdlib_project_or_listed_requirement():
    missing = uncovered_imports(imported_top_level_modules(), _requirement_names(ROOT / "requirements-test.txt"))
    assert not missing, "imports not covered by requirements-test.txt: " + "; ".join(missing)


def test_the_library_needs_only_the_runtime_requirements():
    """The library (not the tests) imports nothing that only requirements-test.txt installs."""
    library = {m: [f for f in files if f.startswith("convmixer_dist")] for m, files in imported_top_level_modules().items()}
    library = {m: files for m, files in library.items() if files}
    missing = uncovered_imports(library, _requirement_names(ROOT / "requirements.txt"))
    assert not missing, "library imports missing from requirements.txt: " + "; ".join(missing)


def test_the_check_reports_transitive_and_absent_packages():
    """google.protobuf arrives only as TensorFlow's dependency and is listed nowhere; a module that is
    not installed at all has no distribution: both are reported, listed ones are not."""
    listed = _requirement_names(ROOT / "requirements-test.txt")
    found = {"google": ["tests/x.py"], "no_such_module_xyz": ["tests/y.py"], "numpy": ["tests/z.py"], "json": ["a.py"]}
    missing = uncovered_imports(found, listed)
    assert [m.split(" ")[0] for m in missing] == ["google", "no_such_module_xyz"]
    assert "scipy" not in _requirement_names(ROOT / "requirements.txt")
