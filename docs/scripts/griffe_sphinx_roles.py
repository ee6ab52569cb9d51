"""Griffe extension: render Sphinx cross-reference roles in docstrings as autorefs.

The library's docstrings are Google style but refer to other objects with Sphinx roles
(``:func:`tokinteract.kd_loss```). mkdocstrings renders docstrings as Markdown, where the
role would show literally. This extension rewrites each role into an *optional* autoref
to the object's canonical path (``tokinteract.kd_loss`` -> ``tokinteract.kd.kd_loss``;
a bare name is looked up in the docstring's module, then in the package): a link when the
target is rendered somewhere on the site, plain code otherwise, never a ``--strict`` warning.

It also splits a grouped parameter line of an ``Args:`` or ``Attributes:`` section
(``cmap, alpha: ...``, not Google style, which griffe would report as an unknown parameter)
into one entry per name, each with the shared description.

:class:`FieldHelp` gives a dataclass field with no docstring of its own the ``help`` text of
its ``field(metadata={"help": ...})`` (the text ``HfArgumentParser`` prints for the CLI), so
the API reference documents every constructor argument of the configuration dataclasses.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`~?([A-Za-z_][\w.]*)`")


def rewrite_roles(text: str, resolve: Callable[[str], str] = lambda name: name) -> str:
    """Replace every ``:role:`target``` in ``text`` by an optional autoref to ``resolve(target)``."""

    def repl(match: re.Match[str]) -> str:
        target = match.group(1)
        return f'<autoref identifier="{resolve(target)}" optional><code>{target}</code></autoref>'

    return ROLE.sub(repl, text)


_SECTION = re.compile(
    r"^(\s*)(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|Other Parameters|Attributes):\s*$"
)
_GROUPED = re.compile(r"^(\s+)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)\s*:(.*)$")


def split_grouped_params(text: str) -> str:
    """One ``name: description`` entry per name for grouped lines inside ``Args:`` sections.

    Continuation lines of a grouped entry are repeated under every name.
    """
    lines = text.splitlines()
    out: list[str] = []
    section_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        header = _SECTION.match(line)
        if header:
            section_indent = len(header.group(1))
            out.append(line)
            continue
        indent = len(line) - len(line.lstrip())
        if section_indent is not None and line.strip() and indent <= section_indent:
            section_indent = None
        grouped = _GROUPED.match(line) if section_indent is not None else None
        if grouped is None or indent <= section_indent:  # type: ignore[operator]
            out.append(line)
            continue
        continuation: list[str] = []
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > indent:
            continuation.append(lines[i])
            i += 1
        for name in (n.strip() for n in grouped.group(2).split(",")):
            out.append(f"{grouped.group(1)}{name}:{grouped.group(3)}")
            out += continuation
    return "\n".join(out)


def _canonical(root: griffe.Module, path: str) -> str | None:
    prefix = root.path + "."
    if path == root.path:
        return path
    if not path.startswith(prefix):
        return None
    try:
        obj = root[path[len(prefix):]]
        return obj.target_path if obj.is_alias else obj.path
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)  # type: ignore[arg-type]


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is None:
                continue
            module = obj if obj.is_module else obj.module

            def resolve(name: str, module: griffe.Module = module) -> str:  # type: ignore[assignment]
                for candidate in (f"{module.path}.{name}", name, f"{pkg.path}.{name}"):
                    found = _canonical(pkg, candidate)
                    if found is not None:
                        return found
                return name

            obj.docstring.value = split_grouped_params(rewrite_roles(obj.docstring.value, resolve))


def field_help(node: ast.AST) -> str | None:
    """The ``help`` string of ``x: T = field(..., metadata={"help": "..."})``, else None.

    An f-string's replacement fields are kept as written (``{sorted(METHODS)}``).
    """
    value = getattr(node, "value", None)
    if not isinstance(value, ast.Call) or getattr(value.func, "id", getattr(value.func, "attr", None)) != "field":
        return None
    for kw in value.keywords:
        if kw.arg != "metadata" or not isinstance(kw.value, ast.Dict):
            continue
        for key, val in zip(kw.value.keys, kw.value.values):
            if isinstance(key, ast.Constant) and key.value == "help":
                if isinstance(val, ast.Constant) and isinstance(val.value, str):
                    return val.value
                if isinstance(val, ast.JoinedStr):
                    return "".join(
                        str(part.value) if isinstance(part, ast.Constant) else "{" + ast.unparse(part.value) + "}"
                        for part in val.values
                        if isinstance(part, (ast.Constant, ast.FormattedValue))
                    )
    return None


class FieldHelp(griffe.Extension):
    """Use a dataclass field's ``metadata["help"]`` as its docstring when it has none."""

    def on_attribute_instance(self, *, node: ast.AST | griffe.ObjectNode, attr: griffe.Attribute, **kwargs: Any) -> None:
        if attr.docstring is not None or not isinstance(node, ast.AST):
            return
        text = field_help(node)
        if text:
            attr.docstring = griffe.Docstring(text, parent=attr)
