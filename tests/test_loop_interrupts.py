"""No loop of the library can let an interrupt skip its frame's cleanup.

CPython 3.13 compiles ``while <condition>:`` with the condition repeated at the loop's
end and leaves the jump back outside the exception table (cpython#130279): a
KeyboardInterrupt raised at that jump (where pending signals are run) skips every
``except``, ``finally`` and ``with`` exit of the frame. Inside a ``with lock:`` that
keeps the lock taken for ever; inside a ``try/finally`` that leaks what the
``finally`` would undo. So the library writes such loops as ``while True:`` with a
``break``, whose jump back stays covered. The first test holds the source to that
rule in every Python; the second checks the compiled code where the fault exists.
"""

from __future__ import annotations

import ast
import dis
import sys
import types
from pathlib import Path
from typing import Any, Iterator, List, Set

import pytest

import brokerlock

PACKAGE = Path(brokerlock.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def guarded_while_loops(tree: ast.AST) -> List[int]:
    """Lines of ``while <condition>:`` loops inside a ``try`` or ``with`` of the same
    function (a nested function is a frame of its own)."""
    found: List[int] = []
    guards = (ast.Try, ast.With) + ((ast.TryStar,) if sys.version_info >= (3, 11) else ())

    def visit(node: ast.AST, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                visit(child, False)
                continue
            if isinstance(child, ast.While) and guarded:
                test = child.test
                if not (isinstance(test, ast.Constant) and test.value):
                    found.append(child.lineno)
            visit(child, guarded or isinstance(child, guards))

    visit(tree, False)
    return found


def test_the_rule_finds_the_pattern() -> None:
    sample = "def f(lock, ready):\n    with lock:\n        while not ready():\n            pass\n"
    assert guarded_while_loops(ast.parse(sample)) == [3]
    fixed = (
        "def f(lock, ready):\n    with lock:\n        while True:\n"
        "            if ready():\n                break\n"
    )
    assert guarded_while_loops(ast.parse(fixed)) == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_conditional_loop_inside_a_try_or_with(path: Path) -> None:
    lines = guarded_while_loops(ast.parse(path.read_text(encoding="utf-8")))
    assert not lines, f"{path.name}: 'while <condition>:' inside a try/with at lines {lines}"


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _handlers(entries: List[Any], offset: int) -> Set[int]:
    return {e.target for e in entries if e.start <= offset < e.end}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception tables came with CPython 3.11")
def test_every_jump_back_keeps_the_handlers_of_its_loop() -> None:
    uncovered = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for code in _code_objects(compile(text, str(path), "exec")):
            listing = dis.Bytecode(code)
            entries = listing.exception_entries  # type: ignore[attr-defined]
            for ins in listing:
                if ins.opname != "JUMP_BACKWARD" or ins.positions is None:
                    continue
                line = text.splitlines()[(ins.positions.lineno or 1) - 1].strip()
                if not line.startswith("while "):
                    continue  # (comprehensions' own handlers only restore their variable)
                if _handlers(entries, ins.argval) - _handlers(entries, ins.offset):
                    uncovered.append(f"{path.name}:{ins.positions.lineno}")
    assert not uncovered, f"jumps back outside their loop's handlers: {uncovered}"
