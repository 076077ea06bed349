"""Imports run one way: orchestrator/ -> jobs/<job>/ -> jobs/core/ (the lowest layer). A job never
imports another job, and nothing below the orchestrator imports it. Every import is checked,
including the ones inside functions."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def _layer(module: str):
    """('orchestrator',), ('core',), ('job', name) or None for third-party modules."""
    parts = module.split(".")
    if parts[0] == "orchestrator":
        return ("orchestrator",)
    if parts[0] == "jobs":
        if len(parts) == 1 or parts[1] == "core":
            return ("core",)
        return ("job", parts[1])
    return None


def _violations(repo=REPO):
    found = []
    for package in ("jobs", "orchestrator"):
        for folder, _, names in os.walk(os.path.join(repo, package)):
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                module = os.path.relpath(path, repo)[:-3].replace(os.sep, ".")
                own = _layer(module)
                for line, imported in _imports(path):
                    target = _layer(imported)
                    if target is None or own == ("orchestrator",):
                        continue
                    allowed = target == ("core",) or target == own
                    if not allowed:
                        found.append(f"{os.path.relpath(path, repo)}:{line} imports {imported}")
    return found


def test_imports_run_one_way():
    assert _violations() == []


def test_the_checker_sees_a_violation(tmp_path):
    """The walk is not vacuous: a job importing the orchestrator or another job is reported."""
    fake = tmp_path / "jobs" / "data"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from orchestrator.config import load_config\n    import jobs.train.loop\n")
    (tmp_path / "jobs" / "core").mkdir()
    (tmp_path / "jobs" / "core" / "low.py").write_text("from jobs.data import plan\n")
    (tmp_path / "orchestrator").mkdir()
    found = _violations(str(tmp_path))
    assert any("bad.py:2 imports orchestrator.config" in v for v in found)
    assert any("bad.py:3 imports jobs.train.loop" in v for v in found)
    assert any("low.py:1 imports jobs.data" in v for v in found)
    assert len(found) == 3


@pytest.mark.parametrize("module,layer", [("jobs.core.storage", ("core",)), ("jobs.train.loop", ("job", "train")),
                                          ("orchestrator.cli", ("orchestrator",)), ("torch", None)])
def test_layer_of(module, layer):
    assert _layer(module) == layer
