"""The model server's context window, as it reports it: what a request must fit in.

- vLLM (and SGLang): ``GET /v1/models`` lists each served model with ``max_model_len``;
- llama.cpp: ``GET /props`` has ``default_generation_settings.n_ctx``, the window of one slot
  (the server's ``--ctx-size`` divided among its ``--parallel`` slots).

Asked in a thread at start and again while it is unknown (the server may start after the proxy);
never on a request's path.
"""

from __future__ import annotations

import json
import logging
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass

from ..chat.upstream import get_json

logger = logging.getLogger(__name__)

ASK_TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class ContextWindow:
    tokens: int | None
    source: str  # where the figure came from, or why there is none

    def as_dict(self) -> dict[str, object]:
        return {"tokens": self.tokens, "source": self.source}


UNKNOWN = ContextWindow(None, "not learned yet")


def window_from_models(answer: object, model: str | None) -> int | None:
    """``max_model_len`` of ``model`` in a ``/v1/models`` answer; of the only model served, if none matches."""
    data = answer.get("data") if isinstance(answer, Mapping) else None
    if not isinstance(data, list):
        return None
    cards = [card for card in data if isinstance(card, Mapping)]
    named = [card for card in cards if model is not None and card.get("id") == model]
    chosen = named or (cards if len(cards) == 1 else [])
    length = chosen[0].get("max_model_len") if chosen else None
    return length if type(length) is int and length > 0 else None


def window_from_props(answer: object) -> int | None:
    """llama.cpp's per-slot ``n_ctx`` in a ``/props`` answer."""
    settings = answer.get("default_generation_settings") if isinstance(answer, Mapping) else None
    n_ctx = settings.get("n_ctx") if isinstance(settings, Mapping) else None
    return n_ctx if type(n_ctx) is int and n_ctx > 0 else None


def _ask(base_url: str, path: str, authorization: str | None, verify_tls: bool) -> object:
    try:
        return json.loads(get_json(base_url + path, authorization, ASK_TIMEOUT_SECONDS, verify_tls))
    except (OSError, ValueError, RecursionError, urllib.error.URLError):
        return None


def learn_window(base_url: str, model: str | None, authorization: str | None, verify_tls: bool) -> ContextWindow:
    """Blocking: the upstream's window for ``model``, from whichever API it offers."""
    models = _ask(base_url, "/v1/models", authorization, verify_tls)
    tokens = window_from_models(models, model)
    if tokens is not None:
        return ContextWindow(tokens, "upstream GET /v1/models max_model_len")
    tokens = window_from_props(_ask(base_url, "/props", authorization, verify_tls))
    if tokens is not None:
        return ContextWindow(tokens, "upstream GET /props n_ctx (one slot)")
    if models is None:
        return ContextWindow(None, "upstream not reachable")
    return ContextWindow(None, "the upstream reports no window (neither max_model_len nor /props n_ctx)")


DEFAULT_CONTEXT_TOKENS = 131072  # README "Fitting the context window": assumed when nothing says otherwise


def effective_window(configured: int | None, learned: ContextWindow) -> ContextWindow:
    """The window requests are fitted to: MAX_CONTEXT_TOKENS, else the learned one, else the default."""
    if configured is not None:
        return ContextWindow(configured, "MAX_CONTEXT_TOKENS")
    if learned.tokens is not None:
        return learned
    return ContextWindow(DEFAULT_CONTEXT_TOKENS, f"default; not learned: {learned.source}; set MAX_CONTEXT_TOKENS")
