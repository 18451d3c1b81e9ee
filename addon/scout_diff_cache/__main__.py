"""Command line: ``python -m scout_diff_cache preview [options]``."""

from __future__ import annotations

import sys

from .preview import run

USAGE = "usage: python -m scout_diff_cache preview [--help] [options]"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("  preview   show what the proxy would send for a repository, without any server")
        return 0 if argv else 2
    if argv[0] != "preview":
        print(f"unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
