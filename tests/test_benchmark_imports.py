"""The benchmark scripts name only what the project defines: every `from rlhf.X import a`, every `module.name`
on an imported rlhf (or benchmarks) module, every `(module, "name")` a benchmark patches, and every call of an
rlhf function or class with arguments its signature accepts.

The scripts are read with `ast`, never imported (some need packages only a benchmark environment has, e.g. TRL);
the rlhf modules they name are imported, so a name moved by a refactor fails here, one case per script, instead
of as an ImportError or AttributeError minutes into a benchmark run. A patch of a name the module lacks would not
fail at all (setattr adds it) and would time the stage's current code under the earlier version's label.
"""
from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))
PACKAGES = ("rlhf", "benchmarks")


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))  # benchmarks/ is a namespace package: a folder without __init__.py
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists() or (path.is_dir() and "." not in name)


def _top_level_names(module: str) -> set[str]:
    """What a module of this repository binds at its top level, read from its text (benchmarks are not imported)."""
    path = REPO.joinpath(*module.split("."))
    path = path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"
    if not path.exists():  # a namespace package (benchmarks/) binds nothing but its modules
        return set()
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        else:
            names.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    return names


def _defines(module: str, name: str) -> bool:
    """Whether `module` (rlhf.*: imported; benchmarks.*: read) has `name`, as an attribute or a submodule."""
    if _is_module(f"{module}.{name}"):
        return True
    if module.split(".")[0] == "benchmarks":
        return name in _top_level_names(module)
    return hasattr(importlib.import_module(module), name)


def _locals(function: ast.AST) -> set[str]:
    """Names a function (or lambda) binds itself, other than by importing: its arguments and assignments."""
    args = function.args
    bound = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    bound.update(a.arg for a in (args.vararg, args.kwarg) if a is not None)
    todo = list(function.body) if isinstance(function.body, list) else [function.body]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(node))
        elif not isinstance(node, ast.Lambda):
            bound.add(node.name)
    return bound


class _Names(ast.NodeVisitor):
    """Walks a script with its scopes: which local names are project modules, and what it reads from them."""

    def __init__(self):
        self.scope: dict[str, str] = {}  # local name -> project module
        self.objects: dict[str, tuple[str, str]] = {}  # local name -> (rlhf module, name) of `from rlhf.X import name`
        self.problems: list[str] = []

    def _check(self, node: ast.AST, module: str, name: str, what: str) -> None:
        if not _defines(module, name):
            self.problems.append(f"line {node.lineno}: {what}: {module} has no `{name}`")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] not in PACKAGES:
                continue
            if not _is_module(alias.name):
                self.problems.append(f"line {node.lineno}: import {alias.name}: no such module")
            elif alias.asname:
                self.scope[alias.asname] = alias.name
            else:  # `import rlhf.ppo` binds `rlhf`; `rlhf.ppo.x` is checked through the package's attributes
                self.scope[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level or module.split(".")[0] not in PACKAGES:
            return
        if not _is_module(module):
            self.problems.append(f"line {node.lineno}: from {module} import ...: no module {module}")
            return
        for alias in node.names:
            self._check(node, module, alias.name, f"from {module} import {alias.name}")
            local = alias.asname or alias.name
            if _is_module(f"{module}.{alias.name}"):
                self.scope[local] = f"{module}.{alias.name}"
            else:
                self.scope.pop(local, None)
                self.objects[local] = (module, alias.name)

    def _function(self, node) -> None:
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(default)  # evaluated in the enclosing scope
        saved, saved_objects, bound = self.scope, self.objects, _locals(node)
        self.scope = {k: v for k, v in saved.items() if k not in bound}
        self.objects = {k: v for k, v in saved_objects.items() if k not in bound}
        for child in (node.body if isinstance(node.body, list) else [node.body]):
            self.visit(child)
        self.scope, self.objects = saved, saved_objects
        if not isinstance(node, ast.Lambda):
            for decorator in node.decorator_list:
                self.visit(decorator)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Attribute(self, node: ast.Attribute) -> None:
        # `ppo.sample_responses`, and `rlhf.ppo.sample_responses` after `import rlhf.ppo`
        chain, base = [node.attr], node.value
        while isinstance(base, ast.Attribute):
            chain.insert(0, base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id in self.scope:
            module = self.scope[base.id]
            for name in chain:
                if not _defines(module, name):
                    self.problems.append(f"line {node.lineno}: {base.id}.{'.'.join(chain)}: {module} has no `{name}`")
                    break
                if not _is_module(f"{module}.{name}"):
                    break
                module = f"{module}.{name}"
            return
        self.generic_visit(node)

    def visit_Tuple(self, node: ast.Tuple) -> None:
        # a patch table's `(module, "name", ...)`: patching a name the module lacks adds it and changes nothing
        first, second = (node.elts + [None, None])[:2]
        if (isinstance(first, ast.Name) and first.id in self.scope and isinstance(second, ast.Constant)
                and isinstance(second.value, str)):
            self._check(node, self.scope[first.id], second.value, f"({first.id}, {second.value!r})")
        self.generic_visit(node)

    def _callee(self, func: ast.AST) -> tuple[str, str] | None:
        """(rlhf module, name) of `name(...)` imported from an rlhf module, or of `module.name(...)`."""
        if isinstance(func, ast.Name) and func.id in self.objects:
            return self.objects[func.id]
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in self.scope
                and self.scope[func.value.id].split(".")[0] == "rlhf"):
            return self.scope[func.value.id], func.attr
        return None

    def _check_arguments(self, node: ast.Call) -> None:
        """The call's arguments bind to the callee's signature: a renamed keyword or a missing argument fails here."""
        callee = self._callee(node.func)
        unpacked = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
        if callee is None or unpacked:  # *args / **kwargs: what binds is not known from the text
            return
        module, name = callee
        target = getattr(importlib.import_module(module), name, None)
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):  # not callable, or a builtin without a signature
            return
        try:
            signature.bind(*node.args, **{k.arg: k.value for k in node.keywords})
        except TypeError as error:
            self.problems.append(f"line {node.lineno}: {module}.{name}{signature}: {error}")

    def visit_Call(self, node: ast.Call) -> None:
        self._check_arguments(node)
        # setattr/getattr(module, "name", ...)
        if (isinstance(node.func, ast.Name) and node.func.id in ("setattr", "getattr") and len(node.args) >= 2
                and isinstance(node.args[0], ast.Name) and node.args[0].id in self.scope
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            module, name = self.scope[node.args[0].id], node.args[1].value
            self._check(node, module, name, f"{node.func.id}({node.args[0].id}, {name!r})")
        self.generic_visit(node)


def problems(script: Path) -> list[str]:
    names = _Names()
    names.visit(ast.parse(script.read_text(encoding="utf-8"), filename=str(script)))
    return names.problems


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_benchmark_names_exist(script: Path):
    found = problems(script)
    assert not found, f"benchmarks/{script.name} names what the project does not define:\n  " + "\n  ".join(found)


def test_the_check_catches_a_moved_name(tmp_path):
    script = tmp_path / "old.py"
    script.write_text(
        "from rlhf import ppo\n"
        "from rlhf.models import load_tokenizer\n"  # moved to rlhf.checkpoints
        "from rlhf.ppo import encode_prompt\n"  # became rlhf.chat.prompt_ids
        "PATCH = {(ppo, 'no_such_name'): None}\n"
        "def f(ppo_):\n"
        "    return ppo.pad_left, ppo.masked_mean\n"  # pad_left is rlhf.rollouts'; masked_mean stayed
        "def g(ppo):\n"
        "    return ppo.anything\n"  # a local, not the module
        "ppo.masked_mean(1, 2, 3)\n"  # takes (x, mask)
        "from rlhf.rollouts import cut_at_eos\n"
        "cut_at_eos(responses, eos_id=2, pad_id=0)\n"  # the argument is eos_ids now
    )
    found = problems(script)
    assert found[:4] == [
        "line 2: from rlhf.models import load_tokenizer: rlhf.models has no `load_tokenizer`",
        "line 3: from rlhf.ppo import encode_prompt: rlhf.ppo has no `encode_prompt`",
        "line 4: (ppo, 'no_such_name'): rlhf.ppo has no `no_such_name`",
        "line 6: ppo.pad_left: rlhf.ppo has no `pad_left`",
    ]
    assert len(found) == 6
    assert found[4].startswith("line 9: rlhf.ppo.masked_mean(") and found[4].endswith("too many positional arguments")
    assert found[5].startswith("line 11: rlhf.rollouts.cut_at_eos(") and "eos_ids" in found[5]
