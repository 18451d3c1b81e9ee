"""mitmdump or mitmweb, run in this process with the addons added to its master (no ``-s`` script)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mitmproxy.tools import cmdline, main
from mitmproxy.tools.dump import DumpMaster
from mitmproxy.tools.web.master import WebMaster

from ..mitm import make_addons


class ScoutDumpMaster(DumpMaster):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.addons.add(*make_addons())  # type: ignore[no-untyped-call]


class ScoutWebMaster(WebMaster):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.addons.add(*make_addons())  # type: ignore[no-untyped-call]


def run_mitmproxy(arguments: Sequence[str], web: bool) -> int:
    """Blocks until the proxy stops; mitmproxy exits the process itself on a bad argument or start-up error."""
    if web:
        main.run(ScoutWebMaster, cmdline.mitmweb, arguments)
    else:
        main.run(ScoutDumpMaster, cmdline.mitmdump, arguments)
    return 0
