"""The mitmproxy glue: options, local endpoints, the chat request rewrite, streaming and errors.

The class stays thin; the work lives in the modules it calls. A hook that raises would make
mitmproxy forward the request unmodified, so ``request`` answers every failure itself.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from mitmproxy import contentviews, ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.mode_specs import ProxyMode

from . import __version__
from .access import is_authorized, open_listen_hosts
from .config import (
    CONFIG_OPTION,
    SETTING_NAMES,
    ConfigError,
    Settings,
    load_settings,
    option_name,
    resolve_config_path,
    setting_help,
)
from .contentview import CHAT_VIEW
from .context import ContextProvider, RepoContext, human_bytes
from .errors import ApiError, error_response, json_response, proxy_error_response
from .exclusions import PathFilter
from .flowdata import METADATA_KEY
from .gitrepo import GitError, GitRepo
from .history import history_limits
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import ProxyMetrics
from .mitm_internals import install_error_envelopes, remove_contentview, uninstall_error_envelopes
from .prewarm import Prewarmer, PrewarmRequest, reverse_target
from .prompt import AssembledBody, BadRequest, assemble_body, is_json_media_type, parse_chat_request
from .retention import BodyRetention, strip_context
from .routes import CHAT_PATH, HEALTH_PATH, METRICS_PATH, MODELS_PATH, route_path
from .snapshot import Snapshot, SnapshotLimits
from .tokencount import CountRequest, TokenCounter
from .upstream import TIMED_OUT_KEY, UpstreamDeadlines, probe_upstream
from .usage import StreamUsageTap, UpstreamUsage, ask_for_stream_usage, usage_from_body
from .verdict import (
    CacheTracker,
    CacheVerdict,
    SendHistory,
    SnapshotTokens,
    classify,
    estimate_snapshot_tokens,
    tools_key,
)
from .watcher import ChangeMonitor
from .workdiff import DiffLimits

logger = logging.getLogger(__name__)

MASKED_AUTHORIZATION = "Bearer [TARGET_API_KEY]"
MASKED_CLIENT_AUTHORIZATION = "Bearer [PROXY_API_KEY]"
LOOPBACK = "127.0.0.1"
# Past UPSTREAM_TIMEOUT_MS, so a silent prefill ends in our 504, not in mitmproxy's inactivity cut.
TCP_TIMEOUT_MARGIN_SECONDS = 30
TCP_TIMEOUT_UNLIMITED_SECONDS = 7 * 24 * 3600
# mitmproxy's HTTP streams and flows form reference cycles; a flow in flight during a collection
# reaches the oldest generation, which CPython rarely collects, and holds its multi-MB body there
# (measured: +0.5 MB per request, RSS x3 after 1000 requests). A full collection after this many
# spliced bytes keeps RSS flat; gc.freeze() at start keeps that collection at 1-2 ms.
GC_EVERY_SPLICED_BYTES = 64 * 1024 * 1024
PREWARM_POLL_SECONDS = 0.5


OPTIONAL_STR: Any = str | None


def _option_type(setting: str) -> Any:
    annotation = Settings.model_fields[setting].annotation
    if annotation is int:
        return int | None
    if annotation == tuple[str, ...]:
        return Sequence[str]
    return OPTIONAL_STR  # strings, and booleans given as true/false


class ScoutDiffCache:
    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.provider: ContextProvider | None = None
        self.deadlines = UpstreamDeadlines()
        self._writing_options = False
        self._spliced_since_gc = 0
        self.retention = BodyRetention(keep=Settings.model_fields["keep_full_bodies"].default)
        self.metrics = ProxyMetrics()
        self.tracker = CacheTracker()
        self.token_counter = TokenCounter()
        self._chats: dict[str, ChatFlow] = {}
        self._last_model: str | None = None  # the model clients ask for, for prewarm requests
        self._prewarm_task: asyncio.Task[None] | None = None
        self.prewarmer = Prewarmer(self.metrics, self.tracker)

    # --- lifecycle -------------------------------------------------------------------------------

    def load(self, loader: Loader) -> None:
        install_error_envelopes(self._mitmproxy_error_response)
        contentviews.add(CHAT_VIEW)
        loader.add_option(
            CONFIG_OPTION,
            OPTIONAL_STR,
            None,
            "config.yaml to read (default: $SCOUT_CONFIG, else the project's own config.yaml).",
        )
        for setting in SETTING_NAMES:
            default: Any = [] if _option_type(setting) == Sequence[str] else None
            loader.add_option(
                option_name(setting),
                _option_type(setting),
                default,
                f"{setting_help(setting)} Unset: environment {setting.upper()}, then config.yaml.",
            )

    def configure(self, updated: set[str]) -> None:
        if self._writing_options:
            return  # the change comes from _apply_proxy_options itself
        ours = {CONFIG_OPTION, *(option_name(s) for s in SETTING_NAMES)}
        if self.settings is not None and not (updated & ours):
            if updated & {"listen_host", "mode", "tcp_timeout"}:
                self._apply_proxy_options(self.settings)
            return
        options = {s: getattr(ctx.options, option_name(s)) for s in SETTING_NAMES}
        try:
            config_path = resolve_config_path(ctx.options.scout_config, os.environ)
            settings, sources = load_settings(options, os.environ, config_path)
            path_filter = PathFilter.build(settings.exclude_path_patterns, settings.use_default_excludes)
        except ConfigError as e:
            raise _options_error(f"scout-diff-cache: {e}") from None
        except ValueError as e:  # an exclusion pattern pathspec cannot compile
            raise _options_error(f"scout-diff-cache: invalid setting exclude_path_patterns: {e}") from None
        try:
            repo = GitRepo(settings.git_repo_path)
        except GitError as e:
            raise _options_error(f"scout-diff-cache: invalid setting git_repo_path: {e}") from None
        self._apply_proxy_options(settings)
        self._stop_monitor()
        monitor = ChangeMonitor(repo.toplevel, [repo.git_dir, repo.common_dir])
        monitor.start()
        self.settings = settings
        self.retention.keep = settings.keep_full_bodies
        self.provider = ContextProvider(
            repo,
            monitor,
            SnapshotLimits(settings.max_file_bytes, settings.max_snapshot_bytes, path_filter),
            DiffLimits(settings.max_file_bytes, settings.max_diff_bytes, path_filter),
            metrics=self.metrics,
            history_limits=history_limits(settings),
        )
        logger.info(
            "scout-diff-cache %s: repo %s, inject_context=%s, config file %s, settings from %s",
            __version__,
            repo.toplevel,
            settings.inject_context,
            config_path or "none",
            ", ".join(f"{k}={v}" for k, v in sorted(sources.items()) if v != "default") or "defaults",
        )

    def _apply_proxy_options(self, settings: Settings) -> None:
        """Loopback by default, no open listener without a key, tcp_timeout past the upstream deadline."""
        listen_host = ctx.options.listen_host or LOOPBACK  # mitmproxy's default "" is every interface
        hosts = [ProxyMode.parse(spec).listen_host(listen_host) for spec in ctx.options.mode]
        exposed = open_listen_hosts(hosts)
        if exposed and settings.proxy_api_key is None and not settings.allow_remote_without_key:
            # mitmdump binds before it exits on a startup error: make that bind a loopback one.
            self._write_options(listen_host=LOOPBACK)
            raise _options_error(
                f"scout-diff-cache: refusing to listen on {', '.join(exposed)} without PROXY_API_KEY: anyone "
                "who can reach it could read the whole repository through the model. Set PROXY_API_KEY, "
                "listen on 127.0.0.1, or set ALLOW_REMOTE_WITHOUT_KEY=true to accept that."
            )
        wanted = (
            settings.upstream_timeout_ms // 1000 + TCP_TIMEOUT_MARGIN_SECONDS
            if settings.upstream_timeout_ms
            else TCP_TIMEOUT_UNLIMITED_SECONDS
        )
        changes: dict[str, Any] = {}
        if listen_host != ctx.options.listen_host:
            changes["listen_host"] = listen_host
        if ctx.options.tcp_timeout < wanted:
            logger.info(
                "tcp_timeout raised from %d to %d s: a silent upstream is bounded by UPSTREAM_TIMEOUT_MS "
                "(504), not cut by mitmproxy's inactivity timeout",
                ctx.options.tcp_timeout,
                wanted,
            )
            changes["tcp_timeout"] = wanted
        if changes:
            self._write_options(**changes)

    def _write_options(self, **changes: Any) -> None:
        """Set mitmproxy options without re-entering our own configure."""
        self._writing_options = True
        try:
            ctx.options.update(**changes)  # type: ignore[no-untyped-call]
        finally:
            self._writing_options = False

    def running(self) -> None:
        # Reverse mode connects upstream eagerly by default and drops the client when that fails,
        # which would take /health and /v1/models down with the upstream.
        if ctx.options.connection_strategy != "lazy":
            ctx.options.connection_strategy = "lazy"
        gc.collect()
        gc.freeze()  # everything alive at start is permanent: later full collections skip it
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # hooks driven by hand, outside mitmproxy's event loop: nothing to prewarm with
        self._prewarm_task = asyncio.create_task(self._prewarm_loop(), name="scout prewarm")

    def done(self) -> None:
        if self._prewarm_task is not None:
            self._prewarm_task.cancel()
        self._stop_monitor()
        self.deadlines.stop_all()
        uninstall_error_envelopes()
        remove_contentview(CHAT_VIEW)

    def _stop_monitor(self) -> None:
        if self.provider is not None:
            self.provider.monitor.stop()

    # --- hooks -----------------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        if self.settings is None or self.provider is None:
            # Only between a failed configure and mitmdump's exit: never forward without context.
            flow.response = error_response(
                ApiError(
                    503, "scout-diff-cache is not configured (see the proxy's log)", "server_error", "not_configured"
                )
            )
            return
        try:
            self._authorize(flow, self.settings)
            await self._route(flow, self.settings, self.provider)
            if flow.response is None:
                await self._forward(flow, self.settings)
        except ApiError as e:
            self._answer_error(flow, e)
        except Exception as e:
            logger.exception("scout-diff-cache: request to %s failed", flow.request.path)
            self._answer_error(
                flow, ApiError(500, f"internal proxy error: {type(e).__name__}: {e}", "server_error", "internal_error")
            )

    def _answer_error(self, flow: http.HTTPFlow, error: ApiError) -> None:
        flow.response = error_response(error)
        if error.status == 401:
            flow.response.headers["www-authenticate"] = 'Bearer realm="scout-diff-cache"'
        self.metrics.error(error.status, "proxy")
        chat = self._chats.pop(flow.id, None)
        if chat is not None:  # failed after the rewrite (the upstream probe)
            self._finish_chat(flow, chat, "proxy_error", None)

    def _mitmproxy_error_response(self, status: int, message: str) -> http.Response:
        """mitmproxy's own error answers (upstream gone, bad client HTTP), as envelopes, counted."""
        self.metrics.error(status, "proxy")
        return proxy_error_response(status, message)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.deadlines.stop(flow)
        assert flow.response is not None
        chat = self._chats.get(flow.id)
        if chat is not None:
            _add_context_headers(flow.response.headers, chat)
        if "text/event-stream" in flow.response.headers.get("content-type", ""):
            identity = flow.response.headers.get("content-encoding", "identity").lower() == "identity"
            if chat is not None and identity:
                chat.tap = StreamUsageTap(remove_usage=chat.usage_added)
                flow.response.stream = chat.tap
            else:
                flow.response.stream = True
        self._mask_upstream_key(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self.deadlines.response_sent(flow)
        chat = self._chats.pop(flow.id, None)
        if chat is not None:
            self._chat_answered(flow, chat)
        if METADATA_KEY in flow.metadata:
            self.retention.flow_done(flow)
        self._collect_garbage_if_due()

    def error(self, flow: http.HTTPFlow) -> None:
        self.deadlines.stop(flow)
        self._mask_upstream_key(flow)
        chat = self._chats.pop(flow.id, None)
        if chat is not None:
            message = flow.error.msg if flow.error is not None else ""
            gone = "client disconnected" in message.lower() or flow.client_conn.timestamp_end is not None
            self._finish_chat(flow, chat, "client_gone" if gone else "upstream_error", None, failure=message)
        if METADATA_KEY in flow.metadata:
            self.retention.flow_done(flow)
        self._collect_garbage_if_due()

    def _collect_garbage_if_due(self) -> None:
        if self._spliced_since_gc >= GC_EVERY_SPLICED_BYTES:
            self._spliced_since_gc = 0
            gc.collect()

    # --- routing ---------------------------------------------------------------------------------

    async def _route(self, flow: http.HTTPFlow, settings: Settings, provider: ContextProvider) -> None:
        path = route_path(flow.request.path)
        method = flow.request.method.upper()
        if path == HEALTH_PATH and method in ("GET", "HEAD"):
            flow.response = await self._health(settings, provider)
            return
        if path == METRICS_PATH and method in ("GET", "HEAD"):
            flow.response = http.Response.make(200, self.metrics.render(), {"content-type": METRICS_CONTENT_TYPE})
            return
        if not settings.inject_context and path == CHAT_PATH and method == "POST":
            self.metrics.answered("passthrough", None)
        if settings.inject_context:
            if path == MODELS_PATH and method == "GET":
                flow.response = json_response(200, {"object": "list", "data": [_model_card(settings.model_id)]})
                return
            if path.startswith(MODELS_PATH + "/") and method == "GET":
                # Clients percent-encode the id ("meta-llama/..." arrives as "meta-llama%2F...").
                flow.response = _model_lookup(unquote(path.removeprefix(MODELS_PATH + "/")), settings.model_id)
                return
            if path == CHAT_PATH:
                if method == "POST":
                    await self._inject(flow, settings, provider)
                elif method != "OPTIONS":  # a CORS preflight goes to the upstream, which answers it
                    flow.response = error_response(
                        ApiError(
                            405,
                            f"{method} is not allowed on {CHAT_PATH}; use POST",
                            "invalid_request_error",
                            "method_not_allowed",
                        )
                    )
                    flow.response.headers["allow"] = "POST, OPTIONS"
                    return

    def _authorize(self, flow: http.HTTPFlow, settings: Settings) -> None:
        """With PROXY_API_KEY set, every request must carry it; it is masked in the flow at once."""
        if settings.proxy_api_key is None:
            return
        authorized = is_authorized(flow.request.headers.get("authorization"), settings.proxy_api_key)
        if "authorization" in flow.request.headers:
            # Masked either way: a rejected header may hold the key with a typo or the wrong scheme.
            flow.request.headers["authorization"] = MASKED_CLIENT_AUTHORIZATION if authorized else "[rejected]"
        if not authorized:
            raise ApiError(
                401,
                "missing or wrong proxy key: send 'Authorization: Bearer <PROXY_API_KEY>'",
                "invalid_request_error",
                "invalid_api_key",
            )

    async def _forward(self, flow: http.HTTPFlow, settings: Settings) -> None:
        """Last steps before mitmproxy sends the request: credentials, reachability, the deadline."""
        if settings.target_api_key is not None:
            flow.request.headers["authorization"] = f"Bearer {settings.target_api_key}"
        elif settings.proxy_api_key is not None:
            flow.request.headers.pop("authorization", None)  # the proxy's key is not the upstream's
        if settings.upstream_connect_timeout_ms:
            unreachable = await probe_upstream(
                flow.request.host, flow.request.port, settings.upstream_connect_timeout_ms
            )
            if unreachable is not None:
                raise unreachable
        chat = self._chats.get(flow.id)
        if chat is not None:
            chat.authorization = flow.request.headers.get("authorization")
        self.deadlines.start(flow, settings.upstream_timeout_ms)

    async def _inject(self, flow: http.HTTPFlow, settings: Settings, provider: ContextProvider) -> None:
        started = time.perf_counter()
        body = flow.request.get_content(strict=False) or b""
        if flow.is_replay == "request" and METADATA_KEY in flow.metadata:
            replayed = _replayed_client_body(flow)
            if replayed is None:
                logger.info("replayed chat request: edited in mitmweb, sent as it is now")
                return
            body = replayed  # the client's part; the context is injected afresh below
        content_type = flow.request.headers.get("content-type")
        if content_type is not None and not is_json_media_type(content_type):
            raise ApiError(
                415,
                f"Content-Type must be application/json, not {content_type!r}",
                "invalid_request_error",
                "unsupported_media_type",
            )
        try:
            chat = parse_chat_request(body)
        except BadRequest as e:
            raise ApiError(400, str(e), "invalid_request_error", "invalid_request", e.param) from None
        usage_added = settings.stream_usage and ask_for_stream_usage(chat.fields)
        self._last_model = _string_or_none(chat.fields.get("model")) or self._last_model
        context = await _context_or_error(provider)
        assembled = assemble_body(
            chat, [context.snapshot.message_json, context.diff.message_json], settings.upstream_model
        )
        body = assembled.body
        flow.request.headers.pop("content-encoding", None)
        # The answer is read for its usage: an uncompressed one, which on a local link costs nothing.
        flow.request.headers.pop("accept-encoding", None)
        flow.request.headers["content-type"] = "application/json"
        flow.request.content = body
        self._spliced_since_gc += len(body)
        base_url = f"{flow.request.scheme}://{flow.request.host}:{flow.request.port}"
        history = self.tracker.before_send(base_url, context.snapshot, tools_key(chat.fields))
        snapshot_start = assembled.context_spans[0][0]
        self._chats[flow.id] = ChatFlow(
            snapshot=context.snapshot,
            diff_bytes=context.diff.size,
            history=history,
            base_url=base_url,
            model=settings.upstream_model or _string_or_none(chat.fields.get("model")),
            usage_added=usage_added,
            messages_bytes=len(body) - snapshot_start,
            started=started,
        )
        self.metrics.injected(len(body), context.diff.size)
        _annotate(flow, context, assembled)
        flow.metadata[METADATA_KEY].update(expected=history.expectation(), stream_usage_added=usage_added)
        logger.debug(
            "chat request: snapshot %s (%s, %d files), diff %s (%d files), body %s, prepared in %.0f ms",
            _short(context.snapshot.commit),
            human_bytes(context.snapshot.size),
            context.snapshot.file_count,
            human_bytes(context.diff.size),
            context.diff.included_files,
            human_bytes(len(body)),
            (time.perf_counter() - started) * 1000,
        )

    def _chat_answered(self, flow: http.HTTPFlow, chat: ChatFlow) -> None:
        response = flow.response
        assert response is not None
        if response.status_code >= 400:
            timed_out = TIMED_OUT_KEY in flow.metadata  # our own 504
            self.metrics.error(response.status_code, "proxy" if timed_out else "upstream")
            self._finish_chat(flow, chat, "proxy_error" if timed_out else "upstream_error", None)
            return
        if chat.tap is not None:
            usage = chat.tap.usage
            if not ctx.options.store_streamed_bodies:
                # What the client got, for mitmweb; raw_content keeps the headers as they were sent.
                response.raw_content = bytes(chat.tap.recorded)
        else:
            usage = usage_from_body(response.get_content(strict=False) or b"")
        exact = self.token_counter.exact(chat.base_url, chat.snapshot)
        if exact is not None:
            tokens: SnapshotTokens | None = SnapshotTokens(exact, exact=True)
        elif usage is not None and usage.prompt_tokens is not None:
            tokens = estimate_snapshot_tokens(usage.prompt_tokens, chat.snapshot.size, chat.messages_bytes)
        else:
            tokens = None
        verdict = classify(usage, tokens, chat.history, chat.snapshot)
        self.tracker.after_answer(chat.base_url, usage, verdict)
        if chat.tap is None:
            response.headers["x-scout-cache"] = _verdict_header(verdict)
        self._finish_chat(flow, chat, verdict.verdict, verdict, usage=usage)
        settings = self.settings
        reports_cache = usage is not None and (usage.reports_cache or chat.history.reports_cache)
        if settings is not None and settings.count_snapshot_tokens and reports_cache:
            verify = not ctx.options.ssl_insecure
            self.token_counter.request(
                CountRequest(chat.base_url, chat.model, chat.authorization, verify), chat.snapshot
            )

    def _finish_chat(
        self,
        flow: http.HTTPFlow,
        chat: ChatFlow,
        outcome: str,
        verdict: CacheVerdict | None,
        *,
        failure: str = "",
        usage: UpstreamUsage | None = None,
    ) -> None:
        """Count the outcome, and show it in the flow's metadata, mitmweb's comment and one log line."""
        self.metrics.answered(outcome, usage)
        metadata = flow.metadata.get(METADATA_KEY)
        if isinstance(metadata, dict):
            metadata["outcome"] = outcome
            if verdict is not None:
                metadata["cache"] = verdict.as_dict()
        if verdict is not None:
            result = verdict.summary()
        elif failure:
            result = f"{outcome.replace('_', ' ')}: {failure}"
        else:
            result = outcome.replace("_", " ")
        status = flow.response.status_code if flow.response is not None else "-"
        if verdict is not None or status != "-":
            flow.comment = f"{flow.comment} · {result}" if flow.comment else result
        prompt = f" · prompt {verdict.prompt_tokens} tok" if verdict and verdict.prompt_tokens is not None else ""
        snapshot_tokens = ""
        if verdict is not None and verdict.snapshot_tokens is not None:
            kind = "exact" if verdict.snapshot_tokens.exact else "estimated"
            snapshot_tokens = f" · snapshot {verdict.snapshot_tokens.count} tok ({kind})"
        detail = f" - {verdict.detail}" if verdict is not None and verdict.cause else ""
        logger.info(
            "chat %s in %.2f s · snap %s · %s · diff %s%s%s · %s%s",
            status,
            time.perf_counter() - chat.started,
            _short(chat.snapshot.commit),
            human_bytes(chat.snapshot.size),
            human_bytes(chat.diff_bytes),
            prompt,
            snapshot_tokens,
            result if verdict is not None else f"no verdict ({result})",
            detail,
        )

    async def _health(self, settings: Settings, provider: ContextProvider) -> http.Response:
        report: dict[str, Any] = {
            "status": "ok",
            "version": __version__,
            "repo": str(provider.repo.toplevel),
            "inject_context": settings.inject_context,
            "model": settings.model_id,
            "watching_changes": provider.monitor.watching,
        }
        try:
            context = await provider.current()
        except GitError as e:
            report.update(status="error", error=str(e))
            return json_response(503, report)
        report.update(
            head=context.snapshot.commit,
            snapshot={
                "commit": context.snapshot.commit,
                "base_commit": context.snapshot.base_commit,
                "history_commits": context.snapshot.tail_commits,
                "bytes": context.snapshot.size,
                "files": context.snapshot.file_count,
                "symlinks": context.snapshot.symlink_count,
                "left_out": context.snapshot.skipped_count,
            },
            diff={
                "bytes": context.diff.size,
                "files": context.diff.included_files,
                "left_out": context.diff.left_out_files,
            },
            snapshot_builds=provider.snapshot_builds,
            cache=self.tracker.recent_summary(),
        )
        return json_response(200, report)

    async def _prewarm_loop(self) -> None:
        """With PREWARM on: every poll, the prewarmer prefills the upstream if HEAD got a new base."""
        while True:
            await asyncio.sleep(PREWARM_POLL_SECONDS)
            settings, provider = self.settings, self.provider
            if settings is not None and provider is not None and settings.prewarm and settings.inject_context:
                await self.prewarmer.poll(
                    provider,
                    reverse_target(ctx.options.mode),
                    PrewarmRequest.for_settings(settings, self._last_model, not ctx.options.ssl_insecure),
                )

    def _mask_upstream_key(self, flow: http.HTTPFlow) -> None:
        """Keep TARGET_API_KEY out of what mitmweb and mitmdump show once the request has gone."""
        key = self.settings.target_api_key if self.settings is not None else None
        if key is not None and flow.request.headers.get("authorization") == f"Bearer {key}":
            flow.request.headers["authorization"] = MASKED_AUTHORIZATION


def _replayed_client_body(flow: http.HTTPFlow) -> bytes | None:
    """A replayed flow's own body less the context it was sent with, or None if it was edited.

    Every replay gets the context as it is now: a stored flow may have had its snapshot trimmed
    from memory, and a placeholder must never reach the upstream.
    """
    record = flow.metadata[METADATA_KEY]
    try:
        return strip_context(flow.request.raw_content or b"", (record["snapshot_span"], record["diff_span"]))
    except (ValueError, KeyError, TypeError):
        if record.get("snapshot_trimmed"):
            raise ApiError(
                400,
                "this replayed flow was edited after its snapshot was trimmed from memory "
                "(KEEP_FULL_BODIES), so its context cannot be told apart from the client's messages; "
                "send the request again instead",
                "invalid_request_error",
                "trimmed_flow_edited",
            ) from None
        return None


async def _context_or_error(provider: ContextProvider) -> RepoContext:
    try:
        return await provider.current()
    except GitError as e:
        raise ApiError(500, f"cannot read the git repository: {e}", "server_error", "git_error") from None


def _annotate(flow: http.HTTPFlow, context: RepoContext, assembled: AssembledBody) -> None:
    snapshot_span, diff_span = assembled.context_spans
    flow.metadata[METADATA_KEY] = {
        "commit": context.snapshot.commit,
        "snapshot_bytes": context.snapshot.size,
        "snapshot_files": context.snapshot.file_count,
        "snapshot_span": snapshot_span,
        "base_commit": context.snapshot.base_commit,
        "tail_commits": context.snapshot.tail_commits,
        # Where the history blocks start in the body (append-only layout), for the content view.
        "history_start": None
        if context.snapshot.history_start is None
        else snapshot_span[0] + context.snapshot.history_start,
        "diff_bytes": context.diff.size,
        "diff_files": context.diff.included_files,
        "diff_span": diff_span,
        "body_bytes": len(assembled.body),
    }
    flow.comment = (
        f"snap {_short(context.snapshot.commit)} · {human_bytes(context.snapshot.size)} · "
        f"diff {human_bytes(context.diff.size)}"
    )


@dataclass
class ChatFlow:
    """A rewritten chat request on its way: what was sent, for the verdict on its answer."""

    snapshot: Snapshot
    diff_bytes: int
    history: SendHistory
    base_url: str
    model: str | None
    usage_added: bool
    messages_bytes: int
    started: float
    authorization: str | None = None
    tap: StreamUsageTap | None = None


def _add_context_headers(headers: http.Headers, chat: ChatFlow) -> None:
    headers["x-scout-snapshot-commit"] = chat.snapshot.commit or "unborn"
    headers["x-scout-base-commit"] = chat.snapshot.base_commit or "unborn"
    headers["x-scout-snapshot-bytes"] = str(chat.snapshot.size)
    headers["x-scout-diff-bytes"] = str(chat.diff_bytes)
    headers["x-scout-cache-expected"] = chat.history.expectation()


def _verdict_header(verdict: CacheVerdict) -> str:
    """'hit; cached_tokens=..; prompt_tokens=..; snapshot_tokens=..; snapshot_tokens_exact=..; cause=".."'."""
    parts: list[str] = [verdict.verdict]
    for name, value in (
        ("cached_tokens", verdict.cached_tokens),
        ("prompt_tokens", verdict.prompt_tokens),
        ("snapshot_tokens", verdict.snapshot_tokens.count if verdict.snapshot_tokens else None),
    ):
        if value is not None:
            parts.append(f"{name}={value}")
    if verdict.snapshot_tokens is not None:
        parts.append(f"snapshot_tokens_exact={str(verdict.snapshot_tokens.exact).lower()}")
    if verdict.cause:
        parts.append(f'cause="{verdict.cause}"')
    return "; ".join(parts)


def _string_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _options_error(message: str) -> exceptions.OptionsError:
    return exceptions.OptionsError(message)  # type: ignore[no-untyped-call]


def _short(commit: str | None) -> str:
    return commit[:7] if commit else "unborn"


def _model_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "scout-diff-cache"}


def _model_lookup(requested: str, model_id: str) -> http.Response:
    if requested == model_id:
        return json_response(200, _model_card(model_id))
    return error_response(
        ApiError(
            404,
            f"The model '{requested}' does not exist; this proxy serves '{model_id}'",
            "invalid_request_error",
            "model_not_found",
            "model",
        )
    )
