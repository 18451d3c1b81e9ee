"""Outlines: a file's top-level and class-level definitions, for files that do not fit in full.

Parsed with tree-sitter (the grammars bundled in ``tree-sitter-language-pack``; nothing is
downloaded). An outline keeps, in file order, each definition's signature (its text up to its
body, at most ``SIGNATURE_LINES`` lines) and, for Python, the first line of its docstring; the
members of classes, interfaces, traits, impls and modules are outlined one level down. Bodies
become `` ...``. Every symbol the file defines at those levels is named; nothing else is kept.
"""

from __future__ import annotations

import posixpath
import re
import threading
from typing import Any

import tree_sitter_language_pack

from ..memo import ContentMemo
from ..text import quoted

LANGUAGES = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript",
    ".jsx": "javascript", ".ts": "typescript", ".mts": "typescript", ".cts": "typescript", ".tsx": "tsx",
    ".go": "go", ".rs": "rust", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp",
    ".hpp": "cpp", ".hh": "cpp", ".hxx": "cpp", ".java": "java", ".kt": "kotlin", ".kts": "kotlin",
    ".scala": "scala", ".rb": "ruby", ".php": "php", ".cs": "csharp", ".swift": "swift", ".lua": "lua",
    ".sh": "bash", ".bash": "bash", ".dart": "dart", ".ex": "elixir", ".exs": "elixir", ".hs": "haskell",
    ".ml": "ocaml", ".zig": "zig", ".jl": "julia", ".r": "r", ".m": "objc", ".erl": "erlang",
}  # fmt: skip
SIGNATURE_LINES = 3
LINE_CHARACTERS = 200
MAX_DEPTH = 2  # top level, then the members of a class-like definition
_WRAPPERS = {
    "decorated_definition",
    "export_statement",
    "template_declaration",
    "declaration_list",
    "ambient_declaration",
}
_CONTAINER_WORDS = ("class", "interface", "trait", "impl", "module", "namespace", "object", "protocol", "extension")
_DEFINITION_WORDS = ("definition", "declaration", "_item", "method", "class", "module", "function", "signature")
_ALSO = {"struct_specifier", "enum_specifier", "union_specifier", "type_alias", "type_spec"}
_SKIPPED = {
    "import_declaration",
    "import_statement",
    "package_declaration",
    "using_declaration",
    "expression_statement",
}

_QUOTES = re.compile(r"""^[rRbBuUfF]{0,2}(\"\"\"|'''|"|')|(\"\"\"|'''|"|')$""")
_parsers = threading.local()
_outlines: ContentMemo[str | None] = ContentMemo(65536)  # a tree-sitter parser is not to be shared between threads


def language_of(path: bytes) -> str | None:
    return LANGUAGES.get(posixpath.splitext(path.decode("utf-8", "surrogateescape"))[1].lower())


def _parser(language: str) -> Any:
    cache: dict[str, Any] = _parsers.__dict__.setdefault("by_language", {})
    if language not in cache:
        cache[language] = tree_sitter_language_pack.get_parser(language)  # type: ignore[arg-type]
    return cache[language]


def _is_definition(node: Any) -> bool:
    kind: str = node.type
    return kind in _ALSO or (kind not in _SKIPPED and any(word in kind for word in _DEFINITION_WORDS))


def _is_container(node: Any) -> bool:
    kind: str = node.type
    return any(word in kind for word in _CONTAINER_WORDS)


def _line_start(data: bytes, offset: int) -> int:
    return data.rfind(b"\n", 0, offset) + 1


def _signature(data: bytes, node: Any, body: Any) -> list[str]:
    end = body.start_byte if body is not None else node.end_byte
    text = data[_line_start(data, node.start_byte) : end].decode("utf-8", "replace").rstrip()
    lines = [line.rstrip()[:LINE_CHARACTERS] for line in text.split("\n") if line.strip()][:SIGNATURE_LINES]
    if lines and (body is not None or text.count("\n") >= SIGNATURE_LINES):
        lines[-1] += " ..."
    return lines


def _docstring(data: bytes, body: Any) -> str | None:
    """Python: the first line of a docstring, the body's first statement when it is a string."""
    string = body.named_children[0] if body is not None and body.named_children else None
    if string is not None and string.type == "expression_statement" and string.named_children:
        string = string.named_children[0]  # older grammars wrap it
    if string is None or string.type != "string":
        return None
    text = _QUOTES.sub("", data[string.start_byte : string.end_byte].decode("utf-8", "replace"))
    line = text.strip().split("\n", 1)[0].strip()[:LINE_CHARACTERS]
    indent = data[_line_start(data, string.start_byte) : string.start_byte].decode("utf-8", "replace")
    return f'{indent}"""{line}"""' if line else None


def _walk(data: bytes, node: Any, depth: int, out: list[str]) -> None:
    for child in node.named_children:
        if child.type in _WRAPPERS:
            _walk(data, child, depth, out)
            continue
        if not _is_definition(child):
            continue
        body = child.child_by_field_name("body")
        out.extend(_signature(data, child, body))
        docstring = _docstring(data, body) if body is not None else None
        if docstring:
            out.append(docstring)
        if body is not None and depth + 1 < MAX_DEPTH and _is_container(child):
            _walk(data, body, depth + 1, out)


def outline_text(path: bytes, data: bytes) -> str | None:
    """The outline lines of a source file; None without a grammar for it or with nothing defined.

    Cached per language and content: a new commit parses only the files it changed.
    """
    language = language_of(path)
    if language is None:
        return None
    return _outlines.get_or_make(ContentMemo.key(data, language), lambda: _outline(language, data))


def _outline(language: str, data: bytes) -> str | None:
    tree = _parser(language).parse(data)
    lines: list[str] = []
    _walk(data, tree.root_node, 0, lines)
    return "\n".join(lines) + "\n" if lines else None


def clear_outlines() -> None:
    _outlines.clear()


def outline_block(path: bytes, outline: str, full_tokens: int) -> str:
    return f"<outline path={quoted(path)} full_tokens={full_tokens}>\n{outline}</outline>\n"
