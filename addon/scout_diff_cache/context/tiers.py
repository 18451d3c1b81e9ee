"""Which files matter most when a repository does not fit the window: priority tiers and references.

Tiers, highest first (README "Fitting the context window"):

0. ``INCLUDE_FIRST``: paths matching the user's globs (gitignore syntax);
1. source code;
2. build and configuration files;
3. tests;
4. documentation;
5. data, fixtures, generated and vendored files.

A path is placed by its first matching rule, checked from the most specific: vendored or
generated first (``vendor/x.py`` is vendored, not source), then tests, then by name and extension.
Within a tier, files that more other files reference come first: a file's references are the
number of other files that name it the way imports and includes do: its name (``utils/retry.py``
is named ``retry``) right after a ``.``, a ``/``, ``import``, ``from`` or ``use``, as in ``from
utils.retry import``, ``import retry``, ``require("./retry")``, ``#include "net/retry.h"``.
A bare word or a method call does not count: ``list.py`` is not referenced by every file that
says "list", nor ``format.py`` by every ``.format(``.
Ties go to the shorter path, then bytewise path order. Nothing depends on the machine.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..git.exclusions import PathFilter
from ..memo import ContentMemo

TIER_FIRST, TIER_SOURCE, TIER_BUILD, TIER_TESTS, TIER_DOCS, TIER_DATA = range(6)
TIER_NAMES = ("include_first", "source", "build and config", "tests", "docs", "data, generated, vendored")

_DATA_DIRS = {
    "vendor", "vendors", "third_party", "third-party", "thirdparty", "external", "extern", "deps",
    "node_modules", "bower_components", "fixtures", "fixture", "testdata", "test_data", "test-data",
    "__snapshots__", "generated", "dist", "datasets", "locale", "locales", "i18n",
}  # fmt: skip
_DATA_SUFFIXES = (
    ".min.js", ".min.css", ".map", ".pb.go", "_pb2.py", "_pb2_grpc.py", ".pb.h", ".pb.cc", ".g.dart",
    ".generated.ts", ".generated.cs", ".designer.cs", ".snap",
)  # fmt: skip
_DATA_EXTENSIONS = {
    ".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".xml", ".svg", ".txt", ".dat", ".sql", ".po", ".pot",
    ".ipynb", ".parquet", ".avro", ".geojson", ".patch", ".diff", ".log", ".html", ".htm",
}  # fmt: skip
_TEST_DIRS = {"test", "tests", "testing", "spec", "specs", "__tests__", "__test__", "t", "e2e", "integration_tests"}
_TEST_NAME = re.compile(r"(^test_.*|.*_test|.*_tests|.*\.test|.*\.spec|.*Test|.*Tests|.*_spec|conftest)$")
_DOC_DIRS = {"doc", "docs", "documentation", "man", "wiki"}
_DOC_EXTENSIONS = {".md", ".markdown", ".rst", ".adoc", ".asciidoc", ".org", ".tex", ".texi", ".1", ".3", ".5", ".8"}
_DOC_NAMES = {"readme", "changelog", "changes", "history", "news", "license", "licence", "copying", "authors",
              "contributing", "notice", "code_of_conduct", "security", "todo"}  # fmt: skip
_BUILD_NAMES = {
    "makefile", "gnumakefile", "dockerfile", "containerfile", "cmakelists.txt", "meson.build", "build.gradle",
    "settings.gradle", "pom.xml", "build.xml", "build.sbt", "cargo.toml", "go.mod", "package.json",
    "pyproject.toml", "setup.py", "setup.cfg", "tox.ini", "noxfile.py", "gemfile", "rakefile", "justfile",
    "vagrantfile", "procfile", "build", "build.bazel", "workspace", "module.bazel", "configure.ac",
    "tsconfig.json", "webpack.config.js", "vite.config.ts", "rollup.config.js", "babel.config.js",
}  # fmt: skip
_BUILD_EXTENSIONS = {
    ".toml", ".yaml", ".yml", ".ini", ".cfg", ".conf", ".mk", ".cmake", ".gradle", ".bzl", ".nix",
    ".properties", ".editorconfig", ".gitignore", ".gitattributes", ".dockerignore", ".env.example",
}  # fmt: skip
_SOURCE_EXTENSIONS = {
    ".py", ".pyi", ".pyx", ".js", ".mjs", ".cjs", ".jsx", ".ts", ".mts", ".cts", ".tsx", ".go", ".rs", ".c",
    ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".hxx", ".m", ".mm", ".java", ".kt", ".kts", ".scala",
    ".rb", ".php", ".cs", ".fs", ".swift", ".dart", ".lua", ".pl", ".pm", ".r", ".jl", ".ex", ".exs",
    ".erl", ".hrl", ".hs", ".ml", ".mli", ".clj", ".cljs", ".zig", ".nim", ".v", ".sv", ".vhd", ".sh",
    ".bash", ".zsh", ".fish", ".ps1", ".sql", ".vue", ".svelte", ".elm", ".groovy", ".proto", ".thrift",
    ".graphql", ".css", ".scss", ".sass", ".less", ".el", ".vim", ".asm", ".s", ".cu", ".cuh", ".f90",
}  # fmt: skip
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REFERENCE = re.compile(r"(?:[./]|\b(?:import|from|use)\s+)([A-Za-z_][A-Za-z0-9_]*)(?![\w(])")
# Names too common to say which file a mention means.
_GENERIC_NAMES = {"index", "main", "__init__", "__main__", "mod", "lib", "init", "test", "tests", "setup",
                  "readme", "utils", "util", "types", "common", "base", "config", "constants", "helpers"}  # fmt: skip


def _split(path: bytes) -> tuple[list[str], str, str, str]:
    """(lower-cased folders, lower-cased file name, the name less its last extension, that extension)."""
    text = path.decode("utf-8", "surrogateescape")
    folders = [part.lower() for part in text.split("/")[:-1]]
    name = posixpath.basename(text)
    root, extension = posixpath.splitext(name)
    return folders, name.lower(), root, extension.lower()


def tier_of(path: bytes, include_first: PathFilter | None = None) -> int:
    if include_first is not None and include_first.excludes(path):  # "excludes": matches one of the globs
        return TIER_FIRST
    folders, name, stem, extension = _split(path)
    if any(folder in _DATA_DIRS for folder in folders) or name.endswith(_DATA_SUFFIXES):
        return TIER_DATA
    if any(folder in _TEST_DIRS for folder in folders) or _TEST_NAME.match(stem):
        return TIER_TESTS
    if any(folder in _DOC_DIRS for folder in folders) or extension in _DOC_EXTENSIONS or stem.lower() in _DOC_NAMES:
        return TIER_DOCS
    if name in _BUILD_NAMES or extension in _BUILD_EXTENSIONS or name in _BUILD_EXTENSIONS:
        return TIER_BUILD
    if extension in _SOURCE_EXTENSIONS:
        return TIER_SOURCE
    if extension in _DATA_EXTENSIONS:
        return TIER_DATA
    return TIER_DOCS if not extension else TIER_DATA


def reference_name(path: bytes) -> str | None:
    """The identifier other files use to mean this file, or None if it is too short or too common."""
    _, _, root, _ = _split(path)
    stem = root.split(".", 1)[0]
    if len(stem) < 3 or stem.lower() in _GENERIC_NAMES or not _IDENTIFIER.fullmatch(stem):
        return None
    return stem


_referenced: ContentMemo[frozenset[str]] = ContentMemo(65536)  # per file text: a commit rescans what it changed


def _referenced_names(text: str) -> frozenset[str]:
    key = ContentMemo.key(text.encode("utf-8", "surrogatepass"))
    return _referenced.get_or_make(key, lambda: frozenset(_REFERENCE.findall(text)))


def clear_reference_scans() -> None:
    _referenced.clear()


def reference_counts(contents: Mapping[bytes, str]) -> dict[bytes, int]:
    """For each path, how many other files reference its name (module docstring)."""
    names = {path: reference_name(path) for path in contents}
    wanted = {name for name in names.values() if name is not None}
    mentions: dict[str, int] = dict.fromkeys(wanted, 0)
    own: dict[bytes, set[str]] = {}
    for path, data in contents.items():
        found = wanted.intersection(_referenced_names(data))
        own[path] = found
        for name in found:
            mentions[name] += 1
    return {path: 0 if name is None else mentions[name] - (name in own[path]) for path, name in names.items()}


@dataclass(frozen=True, order=True)
class Priority:
    """Sort key: lower first."""

    tier: int
    minus_references: int
    path_length: int
    path: bytes


def priorities(
    paths: Iterable[bytes], references: Mapping[bytes, int], include_first: PathFilter | None
) -> list[bytes]:
    """The paths, most important first."""
    return sorted(
        paths,
        key=lambda path: Priority(tier_of(path, include_first), -references.get(path, 0), len(path), path),
    )
