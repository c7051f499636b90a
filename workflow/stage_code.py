"""The code a stage runs: its source files (a rule's `code` input) and the interpreter that runs it.

Source files: the stage's module and, transitively, every module of its package that it imports. A rule lists them
as its `code` input (common.smk's code()), so editing any of them reruns the rule: an input newer than the outputs
is Snakemake's own rerun trigger. Imports are read with `ast` wherever they stand (inside functions too: a lazy
import is code the stage runs); only modules of the package are followed.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path


def module_file(name: str, src_dir: Path) -> Path | None:
    """The file of a dotted module name under src_dir (module.py or package/__init__.py), None if neither."""
    base = src_dir.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def with_parents(name: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']: importing a module runs its parent packages' __init__ first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, *([target] if target else [])])


def imported_names(module: str, path: Path) -> set[str]:
    """Every module name an import statement of `path` may load: `import a.b`, `from a.b import c` (a.b, and
    a.b.c in case c is a submodule), relative imports resolved."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                source = resolve_relative(module, path.name == "__init__.py", node.level, node.module)
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def module_sources(module: str, src_dir: str | Path) -> list[str]:
    """Sorted paths of the .py files `python -m <module>` runs from src_dir: the module, its parent packages,
    and transitively every module under src_dir it imports (names outside src_dir are skipped)."""
    src_dir = Path(src_dir)
    package = module.split(".")[0]
    if module_file(module, src_dir) is None:
        raise ValueError(f"module {module!r} has no source file under {src_dir}")
    seen: dict[str, Path] = {}
    todo = with_parents(module)
    while todo:
        name = todo.pop()
        path = module_file(name, src_dir) if name.split(".")[0] == package else None
        if path is None or name in seen:
            continue
        seen[name] = path
        for imported in imported_names(name, path):
            todo += with_parents(imported)
    return sorted({str(path) for path in seen.values()})


def stage_interpreter(executable: str, conda: bool) -> str:
    """The interpreter of the stage commands, as shell text: `executable` (the one running Snakemake, whose
    packages parsed the DAG, so an unactivated venv works), or under conda deployment the `python` of the rule's
    conda env, which Snakemake activates before the command."""
    return "python" if conda else shlex.quote(executable)
