"""The shape of the engine's code: the figures a maintainer watches.

    python tests/shape.py [--check] [PATH]      (nox -s shape)

For every class, how many distinct ``self`` attributes it assigns; for every
function, its length without the docstring and its cyclomatic complexity
(radon); the average complexity. ``--check`` exits 1 when a target is missed:
Pool and Batcher assign at most 20 attributes, no function is longer than 60
lines or more complex than 15, and the average is at most 3.0.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

MAX_ATTRIBUTES = 20  # for each of ENGINE_CLASSES
ENGINE_CLASSES = ("Pool", "Batcher")
MAX_LINES = 60
MAX_COMPLEXITY = 15
MAX_AVERAGE = 3.0


def self_attributes(cls: ast.ClassDef) -> set[str]:
    """The names ``self.<name>`` is assigned in the class's own methods."""
    names = set()
    for node in ast.walk(cls):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if (
                    isinstance(sub, ast.Attribute)
                    and isinstance(sub.value, ast.Name)
                    and sub.value.id == "self"
                ):
                    names.add(sub.attr)
    return names


def code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from ``def`` to the end, less the docstring's."""
    assert function.end_lineno is not None
    lines = function.end_lineno - function.lineno + 1
    first = function.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        assert first.end_lineno is not None
        lines -= first.end_lineno - first.lineno + 1
    return lines


def main() -> int:
    from radon.complexity import cc_visit  # imported here: pytest imports this file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="src/corral", type=pathlib.Path)
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    files = sorted(args.path.rglob("*.py"))
    attributes: dict[str, int] = {}
    lengths: list[tuple[int, str]] = []
    blocks = []
    for file in files:
        source = file.read_text()
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                attributes[f"{file.name}:{node.name}"] = len(self_attributes(node))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((code_lines(node), f"{file.name}:{node.lineno} {node.name}"))
        blocks += [(block, file.name) for block in cc_visit(source)]
    complexities = sorted(
        ((block.complexity, f"{name}:{block.lineno} {block.fullname}") for block, name in blocks),
        reverse=True,
    )
    average = sum(c for c, _ in complexities) / len(complexities)
    lengths.sort(reverse=True)
    engine = {
        key: count for key, count in attributes.items() if key.split(":")[1] in ENGINE_CLASSES
    }

    print(f"{len(files)} files, {len(lengths)} functions, {len(complexities)} radon blocks")
    print("self attributes: " + ", ".join(f"{k} {v}" for k, v in sorted(engine.items())))
    most = sorted(attributes.items(), key=lambda kv: -kv[1])[:5]
    print("  most of any class: " + ", ".join(f"{k} {v}" for k, v in most))
    print("longest functions (lines, docstring excluded):")
    for lines, name in lengths[:5]:
        print(f"  {lines:4d}  {name}")
    print("most complex (radon cyclomatic complexity):")
    for complexity, name in complexities[:5]:
        print(f"  {complexity:4d}  {name}")
    print(f"average complexity: {average:.2f}")

    missed = [f"{k} assigns {v} self attributes" for k, v in engine.items() if v > MAX_ATTRIBUTES]
    missed += [f"{name} has {lines} lines" for lines, name in lengths if lines > MAX_LINES]
    missed += [f"{name} has complexity {c}" for c, name in complexities if c > MAX_COMPLEXITY]
    if average > MAX_AVERAGE:
        missed.append(f"average complexity {average:.2f} > {MAX_AVERAGE}")
    for miss in missed:
        print(f"target missed: {miss}")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
