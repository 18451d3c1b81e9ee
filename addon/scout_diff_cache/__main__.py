"""``python -m scout_diff_cache``: the same as the ``scout-diff-cache`` command (cli/main.py)."""

from __future__ import annotations

from .cli.main import entry

if __name__ == "__main__":
    entry()
