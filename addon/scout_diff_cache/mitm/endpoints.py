"""The paths the proxy answers itself: /health, /metrics, and the model list for OpenAI clients."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from mitmproxy import http

from .. import __version__
from ..chat.errors import ApiError
from ..chat.routes import HEALTH_PATH, METRICS_PATH, MODELS_PATH, route_path
from ..context.provider import ContextProvider
from ..context.snapshot import Snapshot
from ..git.errors import GitError
from ..observe.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..settings import Settings
from .fitting import fitted_context
from .hooks import error_response, json_response, request_hook
from .state import ScoutState


class LocalEndpoints:
    def __init__(self, state: ScoutState) -> None:
        self.state = state

    @request_hook
    async def request(self, flow: http.HTTPFlow) -> None:
        settings, provider = self.state.configured()
        path = route_path(flow.request.path)
        method = flow.request.method.upper()
        if path == HEALTH_PATH and method in ("GET", "HEAD"):
            flow.response = await self.health(settings, provider)
        elif path == METRICS_PATH and method in ("GET", "HEAD"):
            flow.response = http.Response.make(200, self.state.metrics.render(), {"content-type": METRICS_CONTENT_TYPE})
        elif settings.inject_context and method == "GET" and path == MODELS_PATH:
            flow.response = json_response(200, {"object": "list", "data": [model_card(settings.model_id)]})
        elif settings.inject_context and method == "GET" and path.startswith(MODELS_PATH + "/"):
            # Clients percent-encode the id ("meta-llama/..." arrives as "meta-llama%2F...").
            flow.response = model_lookup(unquote(path.removeprefix(MODELS_PATH + "/")), settings.model_id)

    async def health(self, settings: Settings, provider: ContextProvider) -> http.Response:
        report: dict[str, Any] = {
            "status": "ok",
            "version": __version__,
            "repo": str(provider.repo.toplevel),
            "inject_context": settings.inject_context,
            "model": settings.model_id,
            "watching_changes": provider.monitor.watching,
        }
        try:
            context, window, budget = await fitted_context(self.state, settings, provider)
        except GitError as e:
            report.update(status="error", error=str(e))
            return json_response(503, report)
        snapshot, diff = context.snapshot, context.diff
        report.update(
            head=snapshot.commit,
            snapshot={
                "commit": snapshot.commit,
                "base_commit": snapshot.base_commit,
                "history_commits": snapshot.tail_commits,
                "bytes": snapshot.size,
                "files": snapshot.file_count,
                "symlinks": snapshot.symlink_count,
                "left_out": snapshot.skipped_count,
                "redacted_secrets": snapshot.redacted,
            },
            diff={
                "bytes": diff.size,
                "files": diff.included_files,
                "left_out": diff.left_out_files,
                "redacted_secrets": diff.redacted,
            },
            window={
                "tokens": window.tokens,
                "source": window.source,
                "learned": self.state.window.as_dict(),
                "message_1_share_tokens": budget.tokens,
                "counted_by": budget.measure.name,
            },
            fit=snapshot.fit.as_dict() | {"history_tokens": snapshot.tail_tokens} if snapshot.fit else None,
            snapshot_builds=provider.snapshot_builds,
            build_cache=build_cache_report(provider),
            cache=self.state.tracker.recent_summary(),
            retrieval=self.retrieval(settings, snapshot),
        )
        return json_response(200, report)

    def retrieval(self, settings: Settings, snapshot: Snapshot) -> dict[str, Any]:
        """The search index of the files message 1 left out."""
        retriever = self.state.retriever
        if settings.retrieval_tokens == 0 or retriever is None:
            return {"status": "off"}
        if snapshot.fit is None or not snapshot.fit.cut:
            return {"status": "nothing left out"}
        index = retriever.state()
        return {
            "status": index.status,
            "files": index.files,
            "bytes": index.bytes,
            "build_seconds": round(index.build_seconds, 3),
            "commit": index.commit,
        }


def build_cache_report(provider: ContextProvider) -> dict[str, Any]:
    """Where the build cache is, and what this process read back from it, missed and wrote, per kind."""
    if provider.builds is None:
        return {"dir": None}
    cache = provider.builds.cache
    return {"dir": str(cache.root), **cache.counts()}


def model_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "scout-diff-cache"}


def model_lookup(requested: str, model_id: str) -> http.Response:
    if requested == model_id:
        return json_response(200, model_card(model_id))
    return error_response(
        ApiError(
            404,
            f"The model '{requested}' does not exist; this proxy serves '{model_id}'",
            "invalid_request_error",
            "model_not_found",
            "model",
        )
    )
