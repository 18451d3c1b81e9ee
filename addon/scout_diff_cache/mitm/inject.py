"""Context injection: every chat request goes upstream as snapshot, working diff, then the client's messages.

Only the client's own body is parsed; the context messages are spliced in as the JSON bytes they
were built as. The rewrite is recorded for the other addons: a ``ChatRecord`` in the shared state
(what was sent, for the verdict) and a small dict in ``flow.metadata`` (sizes and the context
messages' spans in the body, for mitmweb, replays and body retention).

A replayed flow (mitmweb's replay, ``client_replay``) gets the context as it is now, never its
stored one: a stored flow may have had its snapshot trimmed from memory.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import http

from ..chat.body import decoded_body
from ..chat.errors import ApiError
from ..chat.fit import Fit, Window
from ..chat.request import AssembledBody, BadRequest, ChatRequest, assemble_body, is_json_media_type, parse_chat_request
from ..chat.routes import CHAT_PATH, is_chat_route, is_near_chat_route, route_path
from ..chat.usage import ask_for_stream_usage
from ..context.fit import FitReport, WindowBudget
from ..context.framing import strip_context
from ..context.provider import ContextProvider, RepoContext
from ..git.errors import GitError
from ..observe.verdict import tools_key
from ..settings import Settings
from ..text import human_bytes, path_text, short_commit
from .conversations import Turn, continued, fresh, message_hashes
from .fitting import fit_chat, fitted_context
from .hooks import error_response, request_hook
from .retrieve import RetrievalNote, with_retrieval
from .state import METADATA_KEY, PREFIX_KEY_HEADER, ChatRecord, ScoutState

logger = logging.getLogger(__name__)

PARSE_ON_LOOP_BYTES = 1 << 20


class ContextInjection:
    def __init__(self, state: ScoutState) -> None:
        self.state = state

    @request_hook
    async def request(self, flow: http.HTTPFlow) -> None:
        settings, provider = self.state.configured()
        if not is_chat_route(flow.request.path):
            if settings.inject_context and is_near_chat_route(flow.request.path):
                raise ApiError(
                    404,
                    f"{route_path(flow.request.path)!r} is not a chat route of any model server (case, a "
                    f"';parameter' or a control character); send chat requests to {CHAT_PATH}",
                    "invalid_request_error",
                    "unknown_route",
                )
            return
        method = flow.request.method.upper()
        if not settings.inject_context:
            if method == "POST":
                self.state.metrics.answered("passthrough", None)
        elif method == "POST":
            await self.inject(flow, settings, provider)
        elif method != "OPTIONS":  # a CORS preflight goes to the upstream, which answers it
            flow.response = error_response(
                ApiError(
                    405,
                    f"{method} is not allowed on {route_path(flow.request.path)}; use POST",
                    "invalid_request_error",
                    "method_not_allowed",
                )
            )
            flow.response.headers["allow"] = "POST, OPTIONS"

    async def lay_out(
        self,
        settings: Settings,
        provider: ContextProvider,
        chat: ChatRequest,
        context: RepoContext,
        *,
        window: Window,
        budget: WindowBudget,
        client_bytes: int,
    ) -> Turn:
        """A continuing conversation's layout if it has one and it fits; else the fresh one, fitted."""
        hashes = await message_hashes(settings, chat, client_bytes)
        turn = await continued(
            self.state,
            settings,
            provider,
            chat,
            context,
            hashes=hashes,
            window=window,
            budget=budget,
            client_bytes=client_bytes,
        )
        if isinstance(turn, Turn):
            self.state.metrics.conversation_turn("continued")
            return turn
        if turn is not None:
            logger.info("conversation laid out afresh: %s", turn)
        fit = await fit_chat(
            self.state, settings, context, chat, client_bytes=client_bytes, window=window, budget=budget
        )
        if fit.diff_cut:
            logger.info(
                "working diff cut to %d of its files so the request fits the window of %d tokens",
                fit.diff.included_files,
                window.tokens,
            )
        kind = "" if not hashes else "fresh" if turn is None else "fell back"
        if kind:
            self.state.metrics.conversation_turn(kind)
        return fresh(context, fit, hashes, kind)

    async def inject(self, flow: http.HTTPFlow, settings: Settings, provider: ContextProvider) -> None:
        started = time.perf_counter()
        if flow.is_replay == "request" and METADATA_KEY in flow.metadata:
            replayed = replayed_client_body(flow)
            if replayed is None:
                logger.info("replayed chat request: edited in mitmweb, sent as it is now")
                return
            body = replayed  # the client's part; the context is injected afresh below
        else:
            encoding = flow.request.headers.get("content-encoding")
            raw = flow.request.raw_content or b""
            if encoding is None or encoding.strip().lower() in ("", "identity"):
                body = decoded_body(raw, encoding, settings.max_body_bytes)
            else:  # inflating may cost up to MAX_BODY_BYTES of work: in a thread, off the event loop
                body = await asyncio.to_thread(decoded_body, raw, encoding, settings.max_body_bytes)
        content_type = flow.request.headers.get("content-type")
        if content_type is not None and not is_json_media_type(content_type):
            raise ApiError(
                415,
                f"Content-Type must be application/json, not {content_type!r}",
                "invalid_request_error",
                "unsupported_media_type",
            )
        try:
            # A large body is parsed in a thread: other connections keep being served meanwhile.
            chat = parse_chat_request(body) if len(body) <= PARSE_ON_LOOP_BYTES else await parse_in_thread(body)
        except BadRequest as e:
            raise ApiError(400, str(e), "invalid_request_error", "invalid_request", e.param) from None
        usage_added = settings.stream_usage and ask_for_stream_usage(chat.fields)
        client_model = chat.fields.get("model")
        if isinstance(client_model, str) and client_model:
            self.state.last_model = client_model
        context, window, budget = await context_or_error(self.state, settings, provider)
        turn = await self.lay_out(
            settings, provider, chat, context, window=window, budget=budget, client_bytes=len(body)
        )
        turn, retrieval = await with_retrieval(
            self.state, settings, chat, turn, current=context.snapshot, window=window, budget=budget
        )
        fit = turn.fit
        context = RepoContext(turn.snapshot, fit.diff)
        prefix_key = turn.snapshot.prefix_key
        if settings.prefix_key_cache_salt:  # the proxy's salt wins: a client's own would split the cache
            chat = ChatRequest({**chat.fields, "cache_salt": prefix_key}, chat.messages)
        assembled = assemble_body(
            chat,
            [turn.snapshot.message_json],
            settings.upstream_model,
            [(injection.position, injection.message_json) for injection in turn.injections],
        )
        if turn.hashes:
            turn.remember_in(self.state, len(chat.messages))
        body = assembled.body
        flow.request.headers.pop("content-encoding", None)
        # The answer is read for its usage: an uncompressed one, which on a local link costs nothing.
        flow.request.headers.pop("accept-encoding", None)
        flow.request.headers["content-type"] = "application/json"
        for name in (PREFIX_KEY_HEADER, *settings.prefix_key_headers):
            flow.request.headers[name] = prefix_key  # what cluster routers hash to pick the replica
        flow.request.content = body
        self.state.spliced_bytes += len(body)
        self.state.snapshot_index.remember(context.snapshot)
        base_url = f"{flow.request.scheme}://{flow.request.host}:{flow.request.port}"
        history = self.state.tracker.before_send(base_url, context.snapshot, tools_key(chat.fields))
        # The working diff and change messages; retrieved files are counted apart (metrics, x-scout-retrieval).
        injected_bytes = sum(
            len(injection.message_json) for injection in turn.injections if injection.kind != "retrieved"
        )
        self.state.chats[flow.id] = ChatRecord(
            snapshot=context.snapshot,
            diff_bytes=injected_bytes,
            history=history,
            base_url=base_url,
            model=settings.upstream_model or (client_model if isinstance(client_model, str) else None),
            usage_added=usage_added,
            messages_bytes=len(body) - assembled.context_spans[0][0],
            started=started,
            diff_cut=fit.diff_cut,
            window_header=window_header(fit, window, context.snapshot.fit),
            conversation=conversation_note(turn),
            retrieval=header_safe(retrieval_header(retrieval)) if retrieval else "",
            retrieved=retrieval.files_header if retrieval else "",
        )
        self.state.metrics.injected(len(body), injected_bytes)
        self.state.metrics.redacted(context.snapshot.redacted, context.diff.redacted)
        annotate(flow, context, assembled, fit_record(fit, window), conversation_note(turn), retrieval=retrieval)
        flow.metadata[METADATA_KEY].update(expected=history.expectation(), stream_usage_added=usage_added)
        logger.debug(
            "chat request: snapshot %s (%s, %d files), diff %s (%d files), body %s, prepared in %.0f ms",
            short_commit(context.snapshot.commit),
            human_bytes(context.snapshot.size),
            context.snapshot.file_count,
            human_bytes(context.diff.size),
            context.diff.included_files,
            human_bytes(len(body)),
            (time.perf_counter() - started) * 1000,
        )


async def parse_in_thread(body: bytes) -> ChatRequest:
    return await asyncio.to_thread(parse_chat_request, body)


def replayed_client_body(flow: http.HTTPFlow) -> bytes | None:
    """A replayed flow's own body less the context it was sent with, or None if it was edited.

    Every replay gets the context as it is now: a stored flow may have had its snapshot trimmed
    from memory, and a placeholder must never reach the upstream.
    """
    record = flow.metadata[METADATA_KEY]
    try:
        spans = (record["snapshot_span"], record["diff_span"], *record.get("injected_spans", ()))
        return strip_context(flow.request.raw_content or b"", spans)
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


async def context_or_error(
    state: ScoutState, settings: Settings, provider: ContextProvider
) -> tuple[RepoContext, Window, WindowBudget]:
    try:
        return await fitted_context(state, settings, provider)
    except GitError as e:
        raise ApiError(500, f"cannot read the git repository: {e}", "server_error", "git_error") from None


def fit_record(fit: Fit, window: Window) -> dict[str, object]:
    """How the request was fitted to the window, for mitmweb's view and the verdict."""
    return {
        "window_tokens": window.tokens,
        "window_source": window.source,
        "context_tokens": fit.context_tokens,
        "diff_tokens": fit.diff_tokens,
        "messages_tokens": fit.messages_tokens,
        "answer_tokens": fit.answer_tokens,
        "counted_by": fit.counted_by,
        "diff_cut": fit.diff_cut,
    }


def window_header(fit: Fit, window: Window, snapshot_fit: FitReport | None) -> str:
    """x-scout-window: 'tokens=N; source="..."; message_1_tokens=M; cut_to_fit=..; ...; request_counted_by=".."'."""
    parts = [f"tokens={window.tokens}", f'source="{window.source}"', f"message_1_tokens={fit.context_tokens}"]
    if snapshot_fit is not None:
        parts.append(f"cut_to_fit={str(snapshot_fit.cut).lower()}")
        if snapshot_fit.cut:
            parts += [f"outlined={len(snapshot_fit.outlined)}", f"omitted={len(snapshot_fit.omitted)}"]
        parts.append(f'message_1_counted_by="{snapshot_fit.measure}"')
    parts += [f"diff_cut={str(fit.diff_cut).lower()}", f'request_counted_by="{fit.counted_by}"']
    return "; ".join(parts)


def conversation_note(turn: Turn) -> str:
    """'conversation continued: 3 changes injected', or that it was laid out afresh; "" for a new one (or seed)."""
    if turn.description == "continued":
        return f"conversation continued: {turn.changes} change{'s' if turn.changes != 1 else ''} injected"
    return "conversation laid out afresh (no longer fits)" if turn.description == "fell back" else ""


def retrieval_header(note: RetrievalNote) -> str:
    """x-scout-retrieval: 'retrieved 2 files (3,412 tokens)', or why nothing was: 'index building', ..."""
    return f"retrieved {note.detail}" if note.retrieved else f"{note.outcome.replace('_', ' ')}: {note.detail}"


def header_safe(text: str, limit: int = 300) -> str:
    """Printable ASCII only (a git error may carry anything), at most ``limit`` characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:limit]


def annotate(
    flow: http.HTTPFlow,
    context: RepoContext,
    assembled: AssembledBody,
    fit: dict[str, object],
    conversation: str,
    *,
    retrieval: RetrievalNote | None = None,
) -> None:
    """The flow's metadata (small: sizes and spans, no snapshot) and its mitmweb comment."""
    snapshot_span, diff_span, *injected_spans = assembled.context_spans
    snapshot_fit = context.snapshot.fit
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
        # A continuing conversation's later context messages, among the client's (conversation layout).
        "injected_spans": injected_spans,
        "conversation": conversation,
        "body_bytes": len(assembled.body),
        "fit": fit,
        "snapshot_fit": snapshot_fit.as_dict() if snapshot_fit else None,
        "retrieval": retrieval_header(retrieval) if retrieval else "",
        "retrieved": [
            {"path": path_text(found.path), "why": found.reason}
            for found in (retrieval.retrieved.files if retrieval and retrieval.retrieved else ())
        ],
    }
    retrieved_bytes = len(retrieval.retrieved.message_json) if retrieval and retrieval.retrieved else 0
    cut = ""
    if snapshot_fit is not None and snapshot_fit.cut:
        cut = f" · cut to fit: {context.snapshot.outline_count} outlined, {len(snapshot_fit.omitted)} omitted"
    flow.comment = (
        f"snap {short_commit(context.snapshot.commit)} · {human_bytes(context.snapshot.size)}{cut} · "
        f"diff {human_bytes(sum(end - start for start, end in (diff_span, *injected_spans)) - retrieved_bytes)}"
        f"{' (cut to fit)' if fit['diff_cut'] else ''}"
        + (f" · {conversation}" if conversation else "")
        + (f" · {retrieval.summary}" if retrieval else "")
    )
