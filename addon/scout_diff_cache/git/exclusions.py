"""Path exclusions in gitignore syntax (``pathspec``), shared by the snapshot and the diff."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pathspec

from ..text import path_key

# Noise that costs tokens (lock files, vendored dependencies, minified bundles) and files that
# usually hold secrets; matched whatever the case of their letters. Users re-include with
# "!pattern" in EXCLUDE_PATH_PATTERNS or drop the whole list with USE_DEFAULT_EXCLUDES=false.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    # lock files
    "package-lock.json",
    "npm-shrinkwrap.json",
    "yarn.lock",
    "pnpm-lock.yaml",
    "bun.lockb",
    "bun.lock",
    "poetry.lock",
    "Pipfile.lock",
    "uv.lock",
    "pdm.lock",
    "Cargo.lock",
    "composer.lock",
    "Gemfile.lock",
    "go.sum",
    "flake.lock",
    "Podfile.lock",
    "packages.lock.json",
    "mix.lock",
    "pubspec.lock",
    # vendored dependencies
    "node_modules/",
    # minified bundles and their source maps
    "*.min.js",
    "*.min.mjs",
    "*.min.css",
    "*.bundle.js",
    "*.js.map",
    "*.css.map",
    # environment files
    ".env",
    ".env.*",
    "*.env",
    # private keys and key stores
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "id_rsa*",  # and its copies: id_rsa.old, id_rsa.bak (the .pub too: nothing the model needs)
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*.ppk",
    # credential and token files
    ".netrc",
    ".npmrc",
    ".pypirc",
    ".git-credentials",
    ".pgpass",
    ".htpasswd",
    ".s3cfg",
    ".envrc",
    "**/.aws/credentials",
    "**/.aws/config",
    "**/.docker/config.json",
    "credentials.json",
    "application_default_credentials.json",
    "**/.kube/config",
    "kubeconfig",
    "*.kubeconfig",
    # infrastructure state and variables (they hold provider keys and generated passwords)
    "*.tfstate",
    "*.tfstate.backup",
    "*.tfvars",
    # shell and client histories
    ".bash_history",
    ".zsh_history",
    ".python_history",
    ".psql_history",
    ".mysql_history",
    ".node_repl_history",
    # database dumps
    "*.dump",
    "*dump*.sql",
    "*.sql.gz",
    "*.sql.bz2",
    "*.sql.xz",
    "*.sql.zst",
)


def case_insensitive(pattern: str) -> str:
    """A gitignore pattern that matches whatever the letters' case: ``*.pem`` -> ``*.[pP][eE][mM]``."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in pattern)


@dataclass(frozen=True)
class PathFilter:
    """Decides which repository paths are excluded; patterns are evaluated in order, last match wins."""

    patterns: tuple[str, ...]
    _spec: pathspec.GitIgnoreSpec = field(init=False, repr=False, compare=False)
    _any_bytes: pathspec.GitIgnoreSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # pathspec's fastest backend (RE2, once google-re2 is installed) takes only valid UTF-8 text;
        # a path that is not (any bytes are legal in git) goes to Python's re, which takes its escapes.
        object.__setattr__(self, "_spec", pathspec.GitIgnoreSpec.from_lines(self.patterns))
        object.__setattr__(self, "_any_bytes", pathspec.GitIgnoreSpec.from_lines(self.patterns, backend="simple"))

    @classmethod
    def build(cls, user_patterns: Sequence[str], use_defaults: bool) -> PathFilter:
        """The defaults (matched whatever the case: ``PRIVATE.KEY``, ``my.ENV``), then the user's, as git reads them."""
        defaults = tuple(case_insensitive(p) for p in DEFAULT_EXCLUDES) if use_defaults else ()
        return cls((*defaults, *user_patterns))

    def excludes(self, path: bytes) -> bool:
        try:
            return self._spec.match_file(path.decode("utf-8"))
        except UnicodeDecodeError:
            return self._any_bytes.match_file(path_key(path))
