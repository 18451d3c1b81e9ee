"""Test script loaded after addon/scout.py: makes one of its addons fail inside its request hook.

``SCOUT_TEST_FAILING_ADDON`` names the addon's class. Its view of the shared state is replaced by
one whose ``configured()`` (the first thing every request hook asks) raises.
"""

from __future__ import annotations

import os
from typing import Any

from mitmproxy import addonmanager, ctx


class FailingState:
    def __init__(self, state: Any) -> None:
        self._state = state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)

    def configured(self) -> Any:
        raise RuntimeError("failure injected by the test")


class FailOneAddon:
    def __init__(self) -> None:
        self.done_patching = False

    def configure(self, updated: set[str]) -> None:
        if self.done_patching:
            return
        wanted = os.environ["SCOUT_TEST_FAILING_ADDON"]
        (target,) = [a for a in addonmanager.traverse(ctx.master.addons.chain) if type(a).__name__ == wanted]
        target.state = FailingState(target.state)
        self.done_patching = True


addons = [FailOneAddon()]
