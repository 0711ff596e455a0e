"""Mutation testing of the trainer's checkpoint and resume code: make one small change at a time (a comparison
flipped, a boolean operator swapped, a ``not`` dropped, a constant changed, a statement removed), run the fault
tests against it, and count the changes the tests catch (a failing test "kills" the mutant).

    python scripts/mutate_train.py                  # every mutant of the default files, the default tests
    python scripts/mutate_train.py --limit 40 -v    # 40 mutants spread over the list, one line each

Each mutant is written into a copy of src/ in a temp dir; the working tree is never changed. Prints the kill rate and
the surviving mutants (file:line and the change).
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["src/torchws/train/checkpoint.py", "src/torchws/train/rundir.py", "src/torchws/train/atomic.py"]
TESTS = ["tests/test_train_faults.py", "tests/test_train_reliability.py", "tests/test_train_engine.py",
         "tests/test_train_signals.py::test_stale_temp_files_are_removed_and_never_taken_for_run_files"]  # fmt: skip
SWAPS = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
         ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}  # fmt: skip


@dataclass
class Mutant:
    file: str
    line: int
    change: str
    source: str


def _mutations(node: ast.AST) -> list[tuple[str, ast.AST]]:
    """(description, replacement node) for the small changes that apply to ``node``."""
    out: list[tuple[str, ast.AST]] = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in SWAPS:
                new = copy.deepcopy(node)
                new.ops[i] = SWAPS[type(op)]()
                out.append((f"{type(op).__name__} -> {SWAPS[type(op)].__name__}", new))
    elif isinstance(node, ast.BoolOp):
        new = copy.deepcopy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        out.append(("and <-> or", new))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        out.append(("drop not", copy.deepcopy(node.operand)))
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        out.append((f"{node.value} -> {not node.value}", ast.Constant(not node.value)))
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        out.append((f"{node.value} -> {node.value + 1}", ast.Constant(node.value + 1)))
    return out


class _Replace(ast.NodeTransformer):
    def __init__(self, target: ast.AST, replacement: ast.AST | None) -> None:
        self.target, self.replacement = target, replacement

    def generic_visit(self, node: ast.AST) -> ast.AST | None:
        if node is self.target:
            return self.replacement
        return super().generic_visit(node)


def mutants(relative: str) -> list[Mutant]:
    """Every mutant of one file, in source order. Docstrings and ``__all__`` are left alone."""
    text = (ROOT / relative).read_text()
    tree = ast.parse(text)
    skip = {id(n) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    skip |= {id(n) for n in ast.walk(tree) if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)}  # fmt: skip
    found: list[Mutant] = []
    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        changes = _mutations(node)
        in_body = isinstance(node, (ast.Expr, ast.Assign, ast.AugAssign, ast.Return)) and not isinstance(
            getattr(node, "value", None), ast.Constant)  # fmt: skip
        if in_body:
            changes.append(("remove statement", ast.Pass()))
        for description, replacement in changes:
            mutated = copy.deepcopy(tree)
            mutated = _Replace(_find(mutated, node), replacement).visit(mutated)  # the copy's node at our position
            found.append(Mutant(relative, node.lineno, description, ast.unparse(ast.fix_missing_locations(mutated))))
    found.sort(key=lambda m: (m.line, m.change))
    return found


def _find(tree: ast.AST, like: ast.AST) -> ast.AST | None:
    for node in ast.walk(tree):
        if type(node) is type(like) and getattr(node, "lineno", None) == like.lineno and getattr(
                node, "col_offset", None) == like.col_offset and ast.dump(node) == ast.dump(like):  # fmt: skip
            return node
    return None


def killed(mutant: Mutant, workdir: Path, tests: list[str], timeout: float) -> bool:
    """True when some test fails (or hangs past ``timeout``) with ``mutant`` in place."""
    target = workdir / mutant.file
    original = (ROOT / mutant.file).read_text()
    target.write_text(mutant.source)
    try:
        env = {**os.environ, "PYTHONPATH": str(workdir / "src"), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=timeout)
        return result.returncode != 0
    except subprocess.TimeoutExpired:
        return True
    finally:
        target.write_text(original)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="*", default=FILES)
    parser.add_argument("--tests", nargs="*", default=TESTS)
    parser.add_argument("--limit", type=int, default=0, help="test this many mutants, spread evenly (0: all)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    every = [m for f in args.files for m in mutants(f)]
    chosen = every if not args.limit or args.limit >= len(every) else \
        [every[round(i * len(every) / args.limit)] for i in range(args.limit)]  # fmt: skip
    survivors = []
    with tempfile.TemporaryDirectory(prefix="torchws-mutants-") as tmp:
        workdir = Path(tmp)
        shutil.copytree(ROOT / "src", workdir / "src")
        for number, mutant in enumerate(chosen, 1):
            caught = killed(mutant, workdir, args.tests, args.timeout)
            if not caught:
                survivors.append(mutant)
            if args.verbose:
                print(f"{number}/{len(chosen)} {'killed  ' if caught else 'SURVIVED'} {mutant.file}:{mutant.line} "
                      f"{mutant.change}", flush=True)  # fmt: skip
    kill = len(chosen) - len(survivors)
    print(f"{kill}/{len(chosen)} mutants killed ({100 * kill / max(len(chosen), 1):.0f}%) of {len(every)} generated")
    for m in survivors:
        print(f"survived: {m.file}:{m.line} {m.change}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
