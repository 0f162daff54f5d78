"""A griffe extension for the API reference: corral's docstrings are reST-flavoured
(sphinx fields, roles, doctests, ``::`` literal blocks); mkdocstrings renders
Markdown. Before the docstrings are parsed, this rewrites, outside the fields'
own syntax:

* ``:class:`Pool``` and the other roles into a cross-reference to corral's own
  object (resolved in the docstring's scope, as Sphinx would) or, for any other
  target (anyio's), into inline code;
* a doctest (``>>>`` lines and their output) into a ``pycon`` code block;
* a paragraph ending in ``::`` and the indented block after it into a ``python``
  code block;
* the reST escape ``\\ `` (a backslash and a space) into nothing.

The source files are not changed. Loaded by mkdocs.yml (``extensions:``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|meth|func|attr|exc|obj|data|mod):`(~?)\.?([\w.]+)`")
FENCE = "```"


class RestDocstrings(griffe.Extension):
    """Rewrite every docstring of a loaded package once it is complete."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                text = _roles(obj, obj.docstring.value)
                obj.docstring.value = _literal_blocks(_doctests(text)).replace("\\ ", "")


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias and isinstance(member, griffe.Object):
            found.extend(_walk(member))
    return found


def _roles(obj: griffe.Object, text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        short, target = match.group(1), match.group(2)
        title = target.rsplit(".", 1)[-1] if short else target
        head, _, rest = target.partition(".")
        try:
            path = obj.resolve(head) + (f".{rest}" if rest else "")
        except griffe.NameResolutionError:
            path = target
        if path.split(".", 1)[0] != "corral":
            return f"`{title}`"
        return f"[`{title}`][{path}]"

    return ROLE.sub(replace, text)


def _doctests(text: str) -> str:
    out: list[str] = []
    in_test = False
    for line in text.split("\n"):
        if not in_test and line.startswith(">>>"):
            out.extend(["", f"{FENCE}pycon"])
            in_test = True
        elif in_test and not line.strip():
            out.extend([FENCE, ""])
            in_test = False
            continue
        out.append(line)
    if in_test:
        out.append(FENCE)
    return "\n".join(out)


def _literal_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::") or line.lstrip().startswith(":"):
            out.append(line)
            i += 1
            continue
        lead = line.rstrip()[:-2].rstrip()
        if lead:
            out.append(lead + ":")
        indent = len(line) - len(line.lstrip())
        i += 1
        block: list[str] = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():
            block.pop()
        while block and not block[0].strip():
            block.pop(0)
        body = [b for b in block if b.strip()]
        cut = min((len(b) - len(b.lstrip()) for b in body), default=0)
        pad = " " * indent
        out.extend(["", f"{pad}{FENCE}python"])
        out.extend(f"{pad}{b[cut:]}" if b.strip() else "" for b in block)
        out.extend([f"{pad}{FENCE}", ""])
    return "\n".join(out)
