"""The layout's rules, computed from the code: no stage imports another stage, and `dvc repro` is exact.

Every project module a stage's command imports, at the top of a file or inside a function, directly or through
other modules, must be a dep of that stage in dvc.yaml (a folder dep covers its files): an edit to it changes
what the stage does, so DVC must rerun the stage. Run `python tests/test_architecture.py` to print the report.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf", "tasks", "flows")


def module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """The project modules `path` imports anywhere in its text (top level and inside functions)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from rlhf import tracking`
    return {m for m in found if m.split(".")[0] in PACKAGES and module_file(m) is not None}


def import_closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(imported_modules(module_file(current)) - seen)
    return seen


def stage_modules() -> dict[str, tuple[str, list[str]]]:
    """stage name -> (the module its cmd runs, its deps)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, spec in stages.items():
        match = re.search(r"-m\s+([\w.]+)", str(spec.get("cmd", "")))
        if match:
            out[name] = (match.group(1), [str(d) for d in spec.get("deps", [])])
    return out


def is_empty_init(path: Path) -> bool:
    return path.name == "__init__.py" and not path.read_text().strip("\n ")


def shortfalls() -> list[str]:
    stages = stage_modules()
    stage_of_module = {module: name for name, (module, _) in stages.items()}
    problems = []
    for name, (module, deps) in stages.items():
        for imported in sorted(imported_modules(module_file(module))):
            if imported in stage_of_module and imported != module:
                problems.append(f"stage {name}: {module} imports {imported}, the module of stage "
                                f"{stage_of_module[imported]}; move what they share into a non-stage module")
        for imported in sorted(import_closure(module)):
            path = module_file(imported)
            relative = path.relative_to(REPO).as_posix()
            if is_empty_init(path):
                continue
            if not any(relative == d or relative.startswith(d.rstrip("/") + "/") for d in deps):
                problems.append(f"stage {name}: imports {relative}, which dvc.yaml does not list in its deps")
    return problems


def report() -> str:
    stages = stage_modules()
    lines = [f"{name:<13} {module:<18} imports {len(import_closure(module)) - 1} project modules"
             for name, (module, _) in stages.items()]
    problems = shortfalls()
    lines += problems or [f"ok: {len(stages)} stages; no stage imports another stage; every import is a dvc.yaml dep"]
    return "\n".join(lines)


def test_no_stage_imports_another_and_every_import_is_a_dvc_dep():
    assert not shortfalls(), report()


def test_the_check_catches_a_missing_dep_and_a_stage_import(tmp_path, monkeypatch):
    """The rule can fail: a stage that imports another stage, and a dep missing from dvc.yaml."""
    import tests.test_architecture as check

    fake = tmp_path / "repo"
    (fake / "rlhf").mkdir(parents=True)
    (fake / "rlhf" / "__init__.py").write_text("")
    (fake / "rlhf" / "helper.py").write_text("X = 1\n")
    (fake / "rlhf" / "first.py").write_text("from rlhf.helper import X\n")
    (fake / "rlhf" / "second.py").write_text("def main():\n    from rlhf import first\n")
    (fake / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "first": {"cmd": "python -m rlhf.first", "deps": ["rlhf/first.py"]},
        "second": {"cmd": "python -m rlhf.second", "deps": ["rlhf/second.py", "rlhf/first.py", "rlhf/helper.py"]}}}))
    monkeypatch.setattr(check, "REPO", fake)
    problems = check.shortfalls()
    assert "stage first: imports rlhf/helper.py, which dvc.yaml does not list in its deps" in problems
    assert any(p.startswith("stage second: rlhf.second imports rlhf.first") for p in problems)
    assert len(problems) == 2, problems


if __name__ == "__main__":
    print(report())
    sys.exit(1 if shortfalls() else 0)
