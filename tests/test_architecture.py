"""The layering is a property of the code, checked: import contracts, no import cycle, the type check
of both Kafka back-ends against the transport Protocols, and the confluent back-end without kafka-python."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def cycles(imports: Mapping[str, Iterable[str]]) -> list[set[str]]:
    """The groups of modules that import each other, directly or not (strongly connected, Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in imports.get(module, ()):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = set()
            while not group or member != module:
                member = stack.pop()
                group.add(member)
            if len(group) > 1 or module in imports.get(module, ()):
                found.append(group)

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return found


def test_the_cycle_finder_finds_a_cycle_and_only_that():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_package_imports_itself_back():
    """Function-level imports included: grimp reads every import statement of a module."""
    graph = grimp.build_graph("streamlstm")
    imports = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    assert len(imports) > 40, "the whole package was read"
    assert cycles(imports) == []


def test_the_import_contracts_hold():
    """pyproject.toml's [tool.importlinter]: layers, who may import a Kafka client, who never loads torch."""
    result = run(str(BIN / "lint-imports"), "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_package_type_checks_both_back_ends_against_the_transport_protocol():
    """mypy over streamlstm/ (pyproject.toml's [tool.mypy]); open_transport returns either back-end as a
    Transport, so a method missing or of another signature in either fails here."""
    result = run(sys.executable, "-m", "mypy", "--no-incremental")
    assert result.returncode == 0, result.stdout + result.stderr


HIDE_KAFKA_PYTHON = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kafka" or name.startswith("kafka."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
sys.meta_path.insert(0, Hide())
"""


def test_the_confluent_back_end_imports_without_kafka_python():
    pytest.importorskip("confluent_kafka")
    code = HIDE_KAFKA_PYTHON + """
import streamlstm.transport.confluent
from streamlstm.transport import open_transport
assert not any(name == "kafka" or name.startswith("kafka.") for name in sys.modules), "kafka-python loaded"
try:
    import kafka
except ModuleNotFoundError:
    print("hidden")
"""
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hidden", "the test hides kafka-python"
