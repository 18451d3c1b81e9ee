"""Hostile and odd request bodies: each gets a correct rewrite or an error envelope, and nothing crashes.

The oracle is a small reference validator written here, independent of ``prompt.py``: a body is a
valid chat request when it is UTF-8 (one leading BOM allowed) JSON without NaN/Infinity, numbers
Python can carry through exactly, nesting within ``MAX_NESTING``, and an object whose ``messages``
is an array of objects with a non-empty string ``role`` and a string, array or null ``content``
(``model`` a string, ``stream`` a boolean or null, when present). Valid bodies must come out as
[snapshot, diff, *client messages] with every other field as ``json.loads`` reads the client's
text (duplicate keys: the last wins); every other body must be a 400 envelope (415 for a
non-JSON Content-Type), left unforwarded. No other outcome, a 500 included, is allowed.

Bodies are built as raw JSON text so that duplicate keys, escapes, lone surrogates, BOMs, odd
whitespace and literals Python would never write can all appear. Three kinds of chat-shaped
bodies: valid ones, valid ones with exactly one thing changed (each kind of change its own test
case, so none is left to chance), and ones with many odd things at once. The in-process tests
drive the addon's request hook; a smaller sample goes through a real mitmdump.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from inprocess import ScoutAddons
from scout_diff_cache.chat.request import MAX_NESTING
from scout_diff_cache.context.provider import RepoContext
from scout_diff_cache.mitm.forward import UpstreamForwarding
from scout_diff_cache.mitm.state import METADATA_KEY
from support import (
    BIG_WINDOW,
    CLEARED_ENV_NAMES,
    Proxy,
    Repo,
    Upstream,
    http_request,
    raw_messages,
    run_proxy,
    run_upstream,
)

CHAT = "/v1/chat/completions"
BOM = b"\xef\xbb\xbf"
REPO_FILES: dict[str, str | bytes] = {
    "README.md": "# hostile\n",
    "src/app.py": "print('h\u00e9llo \U0001f600')\n",
    "docs/\u65e5\u672c.md": "\u65e5\u672c\u8a9e\n",
}
REPO_EDIT = {"src/app.py": "print('edited')\n"}
NOT_JSON_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", "json"]
JSON_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-8",
    "Application/JSON",
    "application/vnd.api+json",
]

FAST = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
BIG = settings(FAST, max_examples=8)
E2E = settings(FAST, max_examples=40)


# --- the reference validator ----------------------------------------------------------------------


class _Constant(Exception):
    pass


def _no_constants(name: str) -> Any:
    raise _Constant(name)


def _depth_and_finite(value: object) -> tuple[int, bool]:
    """(how deep arrays and objects nest, whether every float is finite), without recursion."""
    deepest, finite = 0, True
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            finite = False
        elif isinstance(item, dict | list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest, finite


def reference_request(body: bytes) -> dict[str, Any] | None:
    """The client's request as json.loads reads it when the body is a valid chat request, else None."""
    if body.startswith(BOM):
        body = body[len(BOM) :]
    try:
        text = body.decode("utf-8")  # strict: encoded surrogates and overlongs are not UTF-8
        data = json.loads(text, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError, _Constant):  # ValueError: also too many digits
        return None
    depth, finite = _depth_and_finite(data)
    if depth > MAX_NESTING or not finite:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        return None
    for message in data["messages"]:
        if not isinstance(message, dict):
            return None
        role = message.get("role")
        if not isinstance(role, str) or role == "":
            return None
        if "content" in message and not (message["content"] is None or type(message["content"]) in (str, list)):
            return None
    if "model" in data and type(data["model"]) is not str:
        return None
    if "stream" in data and data["stream"] is not None and type(data["stream"]) is not bool:
        return None
    return data


def upstream_fields(expected: dict[str, Any]) -> dict[str, Any]:
    """The fields the upstream should get besides messages: the client's, plus usage for a stream.

    With STREAM_USAGE (the default) a streamed request without ``include_usage: true`` gets it, in
    a ``stream_options`` object kept as sent otherwise; a ``stream_options`` that is not an object
    goes as sent, for the upstream to reject.
    """
    fields = {k: v for k, v in expected.items() if k != "messages"}
    options = fields.get("stream_options")
    if fields.get("stream") is True and (
        options is None or (type(options) is dict and options.get("include_usage") is not True)
    ):
        fields["stream_options"] = {**(options or {}), "include_usage": True}
    return fields


def is_json_type(content_type: str | None) -> bool:
    if content_type is None:
        return True
    media_type = content_type.split(";")[0].strip().lower()
    return re.fullmatch(r"application/([^/;\s]+\+)?json", media_type) is not None


def same(a: object, b: object) -> bool:
    """Equal as JSON values, types included (True is not 1, 1 is not 1.0, -0.0 is not 0.0)."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, dict):
            assert isinstance(y, dict)
            if x.keys() != y.keys():
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif isinstance(x, list):
            assert isinstance(y, list)
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif isinstance(x, float):
            if repr(x) != repr(y):
                return False
        elif x != y:
            return False
    return True


def strict_json(raw: bytes) -> Any:
    """Parse what the upstream gets: strict UTF-8, no NaN/Infinity (which is not JSON)."""
    return json.loads(raw.decode("utf-8"), parse_constant=_no_constants)


# --- raw JSON text --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    """A JSON object as written: keys in order, duplicates allowed."""

    pairs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Raw:
    """Text written as is: NaN, 1e400, broken tokens, deep brackets."""

    text: str


@dataclass(frozen=True)
class Style:
    # "ascii": \u escapes for all non-ASCII; "utf8": non-ASCII as UTF-8, lone surrogates escaped as a careful
    # encoder does; "raw_surrogates": lone surrogates written raw too (bytes that are not UTF-8);
    # "escape_all": every character as \u escapes, keys included.
    strings: str
    comma: str
    colon: str
    upper_hex: bool


def _escape_all(value: str, upper: bool) -> str:
    units = value.encode("utf-16-le", "surrogatepass")
    codes = [int.from_bytes(units[i : i + 2], "little") for i in range(0, len(units), 2)]
    return '"' + "".join(f"\\u{code:04X}" if upper else f"\\u{code:04x}" for code in codes) + '"'


def _string(value: str, style: Style) -> str:
    if style.strings == "escape_all":
        return _escape_all(value, style.upper_hex)
    text = json.dumps(value, ensure_ascii=style.strings == "ascii")
    if style.strings == "utf8":
        text = re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


def emit(node: Any, style: Style) -> str:
    parts: list[str] = []
    stack: list[Any] = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, Raw):
            parts.append(item.text)
        elif isinstance(item, str):
            parts.append(_string(item, style))
        elif isinstance(item, Obj):
            tokens: list[Any] = [Raw("{")]
            for index, (key, value) in enumerate(item.pairs):
                tokens += [Raw(style.comma)] if index else []
                tokens += [key, Raw(style.colon), value]
            stack.extend(reversed([*tokens, Raw("}")]))
        elif isinstance(item, list):
            tokens = [Raw("[")]
            for index, value in enumerate(item):
                tokens += [Raw(style.comma), value] if index else [value]
            stack.extend(reversed([*tokens, Raw("]")]))
        else:  # None, bool, int, float (NaN and infinities come out as their non-JSON literals)
            parts.append(json.dumps(item))
    return "".join(parts)


def styles(hostile: bool) -> st.SearchStrategy[Style]:
    return st.builds(
        Style,
        strings=st.sampled_from(["ascii", "utf8", "escape_all", *(["raw_surrogates"] if hostile else [])]),
        comma=st.sampled_from([",", ", ", ",\n  ", " ,\t", ",\r\n"]),
        colon=st.sampled_from([":", ": ", " : ", ":\n"]),
        upper_hex=st.booleans(),
    )


def mostly(good: st.SearchStrategy[Any], odd: st.SearchStrategy[Any], times: int = 3) -> st.SearchStrategy[Any]:
    """``good`` about ``times`` draws out of ``times + 1`` (and first: Hypothesis starts from the first branch)."""
    return st.one_of(*[good] * times, odd)


ODD_TEXT = [
    "",
    "\x00",
    "\x1f\x7f",
    "\u2028\u2029",
    "\ufeff",
    "\U0001f600",
    "\ud800",
    "\udfff",
    "\udbff\udfff",  # escaped, these two join into U+10FFFF
    "a\ud83dz",
    '"\\/',
    "\u202eevil",
    "e\u0301",
    "</script>",
    "\U000e0041",
]
texts = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(exclude_categories=()), max_size=12),  # surrogates included
    st.sampled_from(ODD_TEXT),
)
ODD_PREFIXES = [BOM + BOM, b" " + BOM, b"\x0b", b"\x0c", b"\x00", b"\xc2\xa0", b"\xe2\x80\xa8", b"//\n"]
ODD_SUFFIXES = [b"garbage", b",", b"}", b"]", b"\x00", b"\xc2\xa0", b"\xff", b"{}", b"\x1a"]
ODD_NUMBERS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "9" * 4301,
    "-" + "1" * 5000,
]
FINE_NUMBERS = ["1e-400", "-0", "-0.0", "1E+2", "0.1e1", "9" * 4300, "12345678901234567890123456789", "5e-324"]
BROKEN_TOKENS = ["01", "+1", ".5", "1.", "0x10", "'x'", "undefined", "True", "nan", "-NaN", '"a\tb"', '"\\x41"', ""]

clean_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
    st.sampled_from(FINE_NUMBERS).map(Raw),
)
# NaN and the infinities come out as the literals the reference refuses.
odd_scalars = st.one_of(st.floats().filter(lambda f: not math.isfinite(f)), st.sampled_from(ODD_NUMBERS).map(Raw))


def objects_of(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Obj]:
    return st.lists(st.tuples(texts, values), max_size=4).map(lambda pairs: Obj(tuple(pairs)))


def values_of(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | objects_of(inner), max_leaves=12)


clean_values = values_of(clean_scalars)
json_values = values_of(mostly(clean_scalars, odd_scalars))  # now and then a NaN, a 1e400, a 5000-digit integer


def nested(depth: int, inner: Any = None) -> Any:
    """``depth`` levels of arrays and objects around ``inner``."""
    value = inner
    for level in range(depth):
        value = [value] if level % 2 else Obj((("k", value),))
    return value


# Around the limit wherever they sit (a top-level field's value starts at depth 2, a message field's at 4);
# far past it, Python's own recursion limit.
deep_values = mostly(
    st.integers(MAX_NESTING - 5, MAX_NESTING).map(nested),
    st.integers(1_000, 50_000).map(lambda n: Raw("[" * n + "]" * n)),
    times=2,
)

# --- chat-shaped requests -------------------------------------------------------------------------

ROLES = ["system", "user", "assistant", "tool", "function", "developer"]
TOOL_CALLS = st.lists(
    st.builds(
        lambda call_id, name, args: Obj(
            (("id", call_id), ("type", "function"), ("function", Obj((("name", name), ("arguments", args)))))
        ),
        texts,
        texts,
        st.one_of(texts, clean_values.map(lambda v: emit(v, Style("ascii", ",", ":", False)))),
    ),
    max_size=2,
)


@st.composite
def fields(draw: st.DrawFn, spec: dict[str, tuple[int, st.SearchStrategy[Any]]]) -> Obj:
    """An object with the keys in ``spec`` (each present with the chance given in percent), in any order.

    Now and then a key is written two or three times, each value drawn afresh: JSON parsers keep the last.
    """
    pairs: list[tuple[str, Any]] = []
    for key, (percent, values) in spec.items():
        if draw(st.integers(1, 100)) <= percent:
            copies = draw(st.sampled_from([1] * 8 + [2, 3]))
            pairs += [(key, draw(values)) for _ in range(copies)]
    return Obj(tuple(draw(st.permutations(pairs))))


def chat_requests(hostile: bool) -> st.SearchStrategy[Obj]:
    """Chat requests: with ``hostile``, wrong types and missing keys mixed in; without, valid in shape."""

    def odd(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], times: int = 3) -> st.SearchStrategy[Any]:
        return mostly(good, bad, times) if hostile else good

    values = json_values if hostile else clean_values
    wrong = st.one_of(clean_scalars, odd_scalars, json_values)
    parts = st.one_of(
        texts.map(lambda t: Obj((("type", "text"), ("text", t)))),
        texts.map(lambda u: Obj((("type", "image_url"), ("image_url", Obj((("url", "data:," + u),)))))),
        st.just(Obj((("type", "input_audio"), ("input_audio", Obj((("data", ""), ("format", "wav"))))))),
        values,  # what a part holds is the upstream's business
    )
    roles = odd(st.sampled_from(ROLES) | texts.filter(bool), st.just("") | wrong)
    contents = odd(st.one_of(texts, st.none(), st.lists(parts, max_size=3)), wrong)
    message_extras = {
        "name": odd(texts, wrong),
        "tool_call_id": odd(texts, wrong),
        "tool_calls": odd(TOOL_CALLS, wrong),
        "function_call": st.one_of(st.just(Obj((("name", "f"), ("arguments", "{}")))), values),
        "refusal": st.one_of(st.none(), texts),
        "extra": odd(values, deep_values),
    }

    @st.composite
    def messages(draw: st.DrawFn) -> Obj:
        extras = draw(st.lists(st.sampled_from(sorted(message_extras)), max_size=2, unique=True))
        spec = {"role": (97 if hostile else 100, roles), "content": (90, contents)}
        return draw(fields(spec | {key: (100, message_extras[key]) for key in extras}))

    top_extras = {
        "temperature": odd(st.floats(0, 2), wrong),
        "max_tokens": odd(st.integers(1, 10_000), wrong),
        "tools": st.lists(values, max_size=2),
        "response_format": values,
        "stream_options": st.just(Obj((("include_usage", True),))),
        "logit_bias": objects_of(st.integers(-100, 100)),
        "user": texts,
        "deep": odd(values, deep_values, times=1),
    }

    @st.composite
    def requests(draw: st.DrawFn) -> Obj:
        extras = draw(st.lists(st.sampled_from(sorted(top_extras)), max_size=2, unique=True))
        spec = {
            "messages": (97 if hostile else 100, odd(st.lists(messages(), max_size=4), wrong, times=6)),
            "model": (60, odd(texts, wrong)),
            "stream": (40, odd(st.booleans() | st.none(), wrong)),
        } | {key: (100, top_extras[key]) for key in extras}
        any_key = odd(values, st.sampled_from(BROKEN_TOKENS).map(Raw))
        spec |= {key: (100, any_key) for key in draw(st.lists(texts, max_size=1))}  # any key at all
        return draw(fields(spec))

    return requests()


@st.composite
def encoded(draw: st.DrawFn, documents: st.SearchStrategy[Any], hostile: bool = True) -> bytes:
    """A document as JSON text, then bytes; with ``hostile``, the odd things clients do at the edges too."""
    text = emit(draw(documents), draw(styles(hostile)))
    utf16 = hostile and draw(st.integers(1, 100)) > 97  # the odd choices come late: Hypothesis starts low
    raw = text.encode("utf-16" if utf16 else "utf-8", "surrogatepass")
    prefix = draw(st.sampled_from([b"", BOM, b" \r\n\t", BOM + b"\n"]))
    suffix = draw(st.sampled_from([b"", b"\n", b" \t\r\n"]))
    if hostile and draw(st.integers(1, 100)) > 80:
        prefix, suffix = draw(
            st.sampled_from([(p, suffix) for p in ODD_PREFIXES] + [(prefix, s) for s in ODD_SUFFIXES])
        )
    raw = prefix + raw + suffix
    if hostile and draw(st.integers(1, 100)) > 95:
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


# --- one mutation of a valid request ----------------------------------------------------------------


def put(obj: Obj, key: str, value: Any, where: str = "last") -> Obj:
    """``obj`` with ``key`` written again: "last" (the value parsers keep), "first" (shadowed) or "replace"."""
    pairs = list(obj.pairs)
    last = max((i for i, (k, _) in enumerate(pairs) if k == key), default=None)
    if where == "first":
        pairs.insert(0, (key, value))
    elif where == "replace" and last is not None:
        pairs[last] = (key, value)
    else:
        pairs.append((key, value))
    return Obj(tuple(pairs))


def drop(obj: Obj, key: str) -> Obj:
    return Obj(tuple((k, v) for k, v in obj.pairs if k != key))


def last_value(obj: Obj, key: str) -> Any:
    return [v for k, v in obj.pairs if k == key][-1]


not_str = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(FINE_NUMBERS).map(Raw), st.lists(clean_values, max_size=2), objects_of(clean_values),
)  # fmt: skip
WRONG = {
    "messages": st.one_of(texts, not_str.filter(lambda v: not isinstance(v, list))),
    "message": st.one_of(texts, not_str.filter(lambda v: not isinstance(v, Obj))),
    "role": st.one_of(st.just(""), not_str),
    "content": not_str.filter(lambda v: v is not None and not isinstance(v, list)),
    "model": not_str,
    "stream": st.one_of(texts, not_str.filter(lambda v: v is not None and not isinstance(v, bool))),
}
VALID = {"messages": st.just([]), "role": st.sampled_from(ROLES), "content": texts, "model": texts, "stream": st.none()}
BAD_BYTES = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe6\x97", b"\xf4\x90\x80\x80", b"\x80", b"\x00", b"\n"]
MARKER = "MUTATION-POINT"
MUTATIONS = [
    *(f"{how}-{key}" for key in VALID for how in ("shadowed", "wrong")),
    *("message", "drop-role", "odd-number", "deep", "bytes", "edges", "truncated", "drop-messages"),
]


@st.composite
def mutated_requests(draw: st.DrawFn, kind: str | None = None) -> bytes:
    """A valid request with exactly one thing changed: invalid for that one reason, or (a shadowed duplicate
    key, nesting just at the limit) still valid."""
    doc = draw(chat_requests(hostile=False))
    history = last_value(doc, "messages") or [Obj((("role", "user"), ("content", "hi")))]
    doc = put(doc, "messages", history, "replace")
    index = draw(st.integers(0, len(history) - 1))

    def with_message(message: Any) -> Obj:
        return put(doc, "messages", [*history[:index], message, *history[index + 1 :]], "replace")

    kind = kind or draw(st.sampled_from(MUTATIONS))
    style = draw(styles(hostile=False))
    if kind == "drop-messages":
        doc = drop(doc, "messages")
    elif kind.startswith(("shadowed-", "wrong-")):
        key = kind.partition("-")[2]
        where = "first" if kind.startswith("shadowed-") else "last"
        if key in ("role", "content"):
            doc = with_message(put(put(history[index], key, draw(VALID[key])), key, draw(WRONG[key]), where))
        else:
            doc = put(put(doc, key, draw(VALID[key])), key, draw(WRONG[key]), where)
    elif kind == "message":
        doc = with_message(draw(WRONG["message"]))
    elif kind == "drop-role":
        doc = with_message(drop(history[index], "role"))
    elif kind == "odd-number":
        number = [Raw(draw(st.sampled_from(ODD_NUMBERS)))]
        doc = with_message(put(history[index], "x", number)) if draw(st.booleans()) else put(doc, "x", number)
    elif kind == "deep":  # a message's fields sit at depth 4, the request's at 2; MAX_NESTING itself is allowed
        past = draw(st.sampled_from([0, 1]))
        if draw(st.booleans()):
            doc = with_message(put(history[index], "x", nested(MAX_NESTING - 3 + past)))
        else:
            doc = put(doc, "x", nested(MAX_NESTING - 1 + past))
    elif kind == "bytes":  # not UTF-8, or a raw control character, inside a string
        doc = with_message(put(history[index], "name", MARKER))
        style = Style("ascii", style.comma, style.colon, style.upper_hex)
    raw = emit(doc, style).encode("utf-8")
    if kind == "bytes":
        raw = raw.replace(MARKER.encode(), draw(st.sampled_from(BAD_BYTES)))
    elif kind == "edges":
        raw = draw(st.sampled_from([b"", *ODD_PREFIXES])) + raw + draw(st.sampled_from(ODD_SUFFIXES))
    elif kind == "truncated":
        raw = raw[: draw(st.integers(0, raw.rindex(b"}") - 1))]
    return raw


def chat_bodies() -> st.SearchStrategy[bytes]:
    """Chat-shaped bodies: valid ones, valid ones with one change, and ones with many odd things at once."""
    return st.one_of(
        encoded(chat_requests(hostile=False), hostile=False),
        mutated_requests(),
        encoded(chat_requests(hostile=True)),
    )


# --- driving the addon in-process ------------------------------------------------------------------


@dataclass
class Harness:
    addon: ScoutAddons
    loop: asyncio.AbstractEventLoop
    upstream: Upstream

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coroutine)

    def context(self) -> RepoContext:
        assert self.addon.provider is not None
        return self.run(self.addon.provider.current())

    def send(self, body: bytes, content_type: str | None = "application/json", method: str = "POST") -> http.HTTPFlow:
        headers = [(b"content-length", str(len(body)).encode())]
        if content_type is not None:
            headers.append((b"content-type", content_type.encode()))
        request = tutils.treq(
            method=method.encode(),
            path=CHAT.encode(),
            host="127.0.0.1",
            port=self.upstream.port,  # a live upstream: the addon probes it before forwarding
            headers=http.Headers(headers),
            content=body,
        )
        flow = tflow.tflow(req=request, resp=False)
        self.run(self.addon.send_request(flow))
        self.addon.get(UpstreamForwarding).deadlines.stop(flow)  # the flow goes nowhere: disarm its timer
        return flow


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    root = tmp_path_factory.mktemp("hostile")
    repo = Repo.create(root / "repo", REPO_FILES)
    repo.write(REPO_EDIT)
    config = root / "empty.yaml"
    config.write_text("{}\n")
    with pytest.MonkeyPatch.context() as env, run_upstream() as upstream:
        for name in CLEARED_ENV_NAMES:
            env.delenv(name, raising=False)
        env.setenv("SCOUT_CONFIG", str(config))
        addon = ScoutAddons()
        with taddons.context(addon) as tctx:
            try:
                tctx.configure(
                    addon,
                    scout_config=str(config),
                    scout_git_repo_path=str(repo.path),
                    scout_max_context_tokens=BIG_WINDOW,  # these bodies are about parsing, not the window
                )
                harness = Harness(addon, tctx.master.event_loop, upstream)
                context = harness.context()
                assert b"print('edited')" in context.diff.message_json  # a real diff, not "clean"
                yield harness
            finally:
                addon.stop()


def assert_error(flow: http.HTTPFlow, body: bytes, status: int) -> dict[str, Any]:
    """An OpenAI-style error envelope answered by the proxy, the request left as the client sent it."""
    response = flow.response
    assert response is not None, f"forwarded, expected a {status}: {body[:300]!r}"
    assert response.status_code == status, (body[:300], response.content)
    assert response.headers["content-type"] == "application/json"
    payload = json.loads(response.content or b"")
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert 0 < len(error["message"]) <= 400  # a clear sentence, never an echo of a huge body
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None or isinstance(error["param"], str)
    assert isinstance(error["code"], str)
    assert error["code"]
    assert flow.request.raw_content == body
    assert METADATA_KEY not in flow.metadata
    return dict(error)


def assert_rewritten(flow: http.HTTPFlow, body: bytes, expected: dict[str, Any], context: RepoContext) -> None:
    """Forwarded as [snapshot, diff, *client messages], every other field as the client sent it."""
    error = flow.response.content[:500] if flow.response is not None else b""
    assert flow.response is None, f"valid body answered {error!r}: {body[:300]!r}"
    sent_raw = flow.request.raw_content
    assert sent_raw is not None
    assert "content-encoding" not in flow.request.headers
    assert flow.request.headers["content-type"] == "application/json"
    assert flow.request.headers["content-length"] == str(len(sent_raw))
    sent = strict_json(sent_raw)  # the upstream gets valid JSON: UTF-8, no NaN/Infinity
    assert isinstance(sent, dict)
    assert raw_messages(sent_raw)[:2] == [context.snapshot.message_json, context.diff.message_json]
    assert same(
        sent["messages"][:2], [json.loads(context.snapshot.message_json), json.loads(context.diff.message_json)]
    )
    assert same(sent["messages"][2:], expected["messages"])
    others = upstream_fields(expected)
    assert same({k: v for k, v in sent.items() if k != "messages"}, others)
    assert METADATA_KEY in flow.metadata


def check(harness: Harness, body: bytes, content_type: str | None = "application/json") -> str:
    """Send ``body`` through the request hook and hold the outcome to the reference; which outcome it was."""
    flow = harness.send(body, content_type)
    if not is_json_type(content_type):
        error = assert_error(flow, body, 415)
        assert error["code"] == "unsupported_media_type"
        return "415"
    expected = reference_request(body)
    if expected is None:
        assert_error(flow, body, 400)
        return "400"
    assert_rewritten(flow, body, expected, harness.context())
    return "rewritten"


# --- properties, in-process ------------------------------------------------------------------------


@FAST
@given(body=st.binary(max_size=200))
def test_arbitrary_bytes(harness: Harness, body: bytes) -> None:
    check(harness, body)


@FAST
@given(body=encoded(st.one_of(json_values, json_values.map(lambda v: Obj((("messages", v),))))))
def test_arbitrary_json_values(harness: Harness, body: bytes) -> None:
    check(harness, body)


@settings(FAST, max_examples=400)
@given(body=chat_bodies(), content_type=st.sampled_from([*JSON_TYPES, *JSON_TYPES, *NOT_JSON_TYPES]))
def test_chat_shaped_requests_with_mutations(harness: Harness, body: bytes, content_type: str | None) -> None:
    check(harness, body, content_type)


@pytest.mark.parametrize("kind", MUTATIONS)
def test_valid_requests_with_one_thing_changed(harness: Harness, kind: str) -> None:
    @settings(FAST, max_examples=25)
    @given(body=mutated_requests(kind))
    def one_kind(body: bytes) -> None:
        outcome = check(harness, body)
        if kind.startswith("shadowed-"):
            assert outcome == "rewritten"  # the generator's own claim: the parser keeps the last key
        elif kind != "deep":
            assert outcome == "400"

    one_kind()


def test_the_generators_reach_every_outcome(harness: Harness) -> None:
    """The properties above mean little unless the chat-shaped bodies are often valid and often not."""
    outcomes: dict[str, int] = {}

    @settings(FAST, max_examples=150)
    @given(body=chat_bodies())
    def tally(body: bytes) -> None:
        outcome = check(harness, body)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    tally()
    assert outcomes.get("rewritten", 0) >= 25, outcomes
    assert outcomes.get("400", 0) >= 25, outcomes


@st.composite
def huge_bodies(draw: st.DrawFn) -> bytes:
    """A few MB in one string or in many messages, valid or broken somewhere after the bulk."""
    style = draw(styles(hostile=False))
    size = draw(st.integers(1_000_000, 3_000_000))
    char = draw(st.sampled_from(["a", "\u00e9", "\u65e5", "\U0001f600", '"', "\\", "\n", "\ud800"]))
    if draw(st.booleans()):  # one long string; written a character at a time, so one character's text repeats
        content = Raw('"' + _string(char, style)[1:-1] * (size // 4) + _string(draw(texts), style)[1:-1] + '"')
        bulk = emit(Obj((("role", "user"), ("content", content))), style)
    else:
        bulk = style.comma.join([emit(Obj((("role", "user"), ("content", char))), style)] * (size // 40))
    tail = draw(st.sampled_from([Obj((("role", "tool"), ("content", "ok"))), Obj((("content", "no role"),)), 7]))
    messages = Raw("[" + bulk + style.comma + emit(tail, style) + "]")
    document = Obj((("model", "m"), ("messages", messages), ("stream", draw(st.booleans()))))
    return draw(st.sampled_from([b"", BOM])) + emit(document, style).encode("utf-8")


@BIG
@given(body=huge_bodies())
def test_very_large_bodies(harness: Harness, body: bytes) -> None:
    check(harness, body)


# --- named cases: regressions worth reading on their own ------------------------------------------


def msgs(*items: str) -> bytes:
    return ('{"model":"m","messages":[' + ",".join(items) + "]}").encode()


USER = '{"role":"user","content":"hi"}'


@pytest.mark.parametrize(
    ("body", "outcome"),
    [
        pytest.param(msgs('{"role":"user","content":"\\ud800 \\udfff x"}'), "rewritten", id="lone-surrogate-escapes"),
        pytest.param(msgs('{"role":"user","content":"\\ud83d\\ude00"}'), "rewritten", id="escaped-astral-pair"),
        pytest.param(b'{"messages":[{"role":"user","content":"\xed\xa0\x80"}]}', "400", id="utf8-encoded-surrogate"),
        pytest.param(BOM + msgs(USER), "rewritten", id="bom"),
        pytest.param(BOM + BOM + msgs(USER), "400", id="two-boms"),
        pytest.param(b" \r\n\t" + msgs(USER) + b"\n\n", "rewritten", id="json-whitespace"),
        pytest.param(b"\x0b" + msgs(USER), "400", id="vertical-tab-is-not-json-whitespace"),
        pytest.param(b'{"messages":[' + USER.encode() + b'],"temperature":NaN}', "400", id="nan"),
        pytest.param(b'{"messages":[],"temperature":-Infinity}', "400", id="minus-infinity"),
        pytest.param(b'{"messages":[],"temperature":1e400}', "400", id="float-overflow"),
        pytest.param(b'{"messages":[],"temperature":1e-400}', "rewritten", id="float-underflow"),
        pytest.param(b'{"messages":[],"seed":' + b"9" * 4300 + b"}", "rewritten", id="int-4300-digits"),
        pytest.param(b'{"messages":[],"seed":' + b"9" * 4301 + b"}", "400", id="int-4301-digits"),
        pytest.param(b'{"messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "400", id="nested-100000"),
        pytest.param(b'{"messages":[{"role":"user","content":' + b"[" * 253 + b"]" * 253 + b"}]}", "rewritten",
                     id="nested-at-the-limit"),
        pytest.param(b'{"messages":[{"role":"user","content":' + b"[" * 254 + b"]" * 254 + b"}]}", "400",
                     id="nested-past-the-limit"),
        pytest.param(b'{"messages":"x","messages":[' + USER.encode() + b"]}", "rewritten", id="dup-key-last-valid"),
        pytest.param(b'{"messages":[' + USER.encode() + b'],"messages":"x"}', "400", id="dup-key-last-invalid"),
        pytest.param(b'{"messages":[{"role":"user","role":"","content":"x"}]}', "400", id="dup-role-last-empty"),
        pytest.param(b'{"\\u006dessages":[' + USER.encode() + b"]}", "rewritten", id="escaped-key"),
        pytest.param(msgs('{"role":"tool","tool_call_id":"1","content":"42"}',
                          '{"role":"function","name":"f","content":null}',
                          '{"role":"assistant","tool_calls":[{"id":"1","type":"function",'
                          '"function":{"name":"f","arguments":"{}"}}]}'), "rewritten", id="tool-and-function"),
        pytest.param(msgs('{"role":"user","content":[{"type":"text","text":"a"},7,null,[]]}'), "rewritten",
                     id="content-parts-of-any-type"),
        pytest.param(msgs('{"role":"user","content":{"type":"text"}}'), "400", id="content-object"),
        pytest.param(msgs('{"role":"user","content":true}'), "400", id="content-bool"),
        pytest.param(b'{"messages":[],"stream":0}', "400", id="stream-zero"),
        pytest.param(b'{"messages":[],"stream":null,"model":""}', "rewritten", id="stream-null-model-empty"),
        pytest.param(b'{"messages":[]}' + b" " * 1000 + b"x", "400", id="trailing-garbage"),
        pytest.param(json.dumps({"messages": []}).encode("utf-16"), "400", id="utf-16"),
        pytest.param(b"\xef\xbb\xbf", "400", id="only-a-bom"),
        pytest.param(b"null", "400", id="null"),
    ],
)  # fmt: skip
def test_named_hostile_bodies(harness: Harness, body: bytes, outcome: str) -> None:
    assert check(harness, body) == outcome


@pytest.mark.parametrize("content_type", NOT_JSON_TYPES)
def test_non_json_content_types_are_415(harness: Harness, content_type: str) -> None:
    body = msgs(USER)
    flow = harness.send(body, content_type)
    error = assert_error(flow, body, 415)
    assert error["code"] == "unsupported_media_type"
    assert repr(content_type) in error["message"]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "HEAD"])
def test_other_methods_are_405(harness: Harness, method: str) -> None:
    body = msgs(USER)
    flow = harness.send(body, method=method)
    error = assert_error(flow, body, 405)
    assert error["code"] == "method_not_allowed"
    assert "POST" in error["message"]
    assert flow.response is not None
    assert flow.response.headers["allow"] == "POST, OPTIONS"


# --- end to end: a real mitmdump --------------------------------------------------------------------


@dataclass
class Live:
    proxy: Proxy
    upstream: Upstream
    snapshot: bytes
    diff: bytes


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("hostile-e2e")
    repo = Repo.create(root / "repo", REPO_FILES)
    repo.write(REPO_EDIT)
    with (
        run_upstream() as upstream,
        run_proxy(
            upstream.url, root / "proxy", {"GIT_REPO_PATH": str(repo.path), "MAX_CONTEXT_TOKENS": BIG_WINDOW}
        ) as proxy,
    ):
        baseline = proxy.post(CHAT, msgs(USER))
        assert baseline.status == 200, baseline.body
        (record,) = upstream.recorded
        snapshot, diff = record.raw_messages()[:2]
        assert "h\u00e9llo \U0001f600" in json.loads(snapshot)["content"]
        assert "print('edited')" in json.loads(diff)["content"]
        upstream.recorded.clear()
        yield Live(proxy, upstream, snapshot, diff)
        assert_still_serving(Live(proxy, upstream, snapshot, diff))


def assert_still_serving(live: Live) -> None:
    """The same mitmdump process is up, answers /health, and never logged a failure of the addon."""
    assert live.proxy.process.poll() is None, live.proxy.log()
    assert live.proxy.get("/health").status == 200
    log = live.proxy.log()
    for sign in ("Addon error", "Traceback", "internal proxy error", "request to /v1/chat/completions failed"):
        assert sign not in log, log


def check_live(live: Live, body: bytes, content_type: str = "application/json") -> str:
    """POST ``body`` through the real proxy and hold the outcome to the reference; which outcome it was."""
    before = len(live.upstream.recorded)
    result = http_request("POST", live.proxy.base_url + CHAT, body, {"content-type": content_type})
    expected = reference_request(body) if is_json_type(content_type) else None
    if expected is None:
        status = 400 if is_json_type(content_type) else 415
        assert result.status == status, (body[:300], result.body)
        assert result.headers["content-type"] == "application/json"
        error = result.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert len(live.upstream.recorded) == before, "an invalid body was forwarded"
        return str(status)
    assert result.status == 200, (body[:300], result.body)
    (record,) = live.upstream.recorded[before:]
    assert int(record.headers["content-length"]) == len(record.body)
    assert record.raw_messages()[:2] == [live.snapshot, live.diff]
    sent = strict_json(record.body)
    assert same(sent["messages"][2:], expected["messages"])
    others = upstream_fields(expected)
    assert same({k: v for k, v in sent.items() if k != "messages"}, others)
    return "forwarded"


def test_a_real_proxy_survives_hostile_bodies(live: Live) -> None:
    outcomes: dict[str, int] = {}

    @E2E
    @given(
        body=st.one_of(chat_bodies(), chat_bodies(), st.binary(max_size=100)),
        content_type=st.sampled_from([*JSON_TYPES[1:], *JSON_TYPES[1:], "text/plain"]),  # urllib fills in a missing one
    )
    def one(body: bytes, content_type: str) -> None:
        outcome = check_live(live, body, content_type)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    one()
    assert outcomes.get("forwarded", 0) >= 8, outcomes
    assert outcomes.get("400", 0) >= 8, outcomes
    assert_still_serving(live)


def test_a_real_proxy_survives_a_huge_and_a_deep_body(live: Live) -> None:
    huge = ('{"messages":[{"role":"user","content":"' + "\u65e5" * 1_500_000 + '"}]}').encode()
    assert check_live(live, huge) == "forwarded"
    assert check_live(live, huge[:-3] + b"]") == "400"  # cut short after the bulk
    assert check_live(live, b'{"messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}") == "400"
    assert check_live(live, b'{"messages":[],"n":' + b"7" * 5000 + b"}") == "400"
    assert check_live(live, b'{"messages":[],"t":1e400}') == "400"
    assert check_live(live, BOM + b'{"messages":[{"role":"user","content":"\\ud800"}]}') == "forwarded"
    assert_still_serving(live)


@pytest.mark.parametrize(("method", "content_type", "status"), [
    ("PATCH", "application/json", 405),
    ("GET", "application/json", 405),
    ("POST", "multipart/form-data; boundary=x", 415),
    ("POST", "text/json", 415),
])  # fmt: skip
def test_a_real_proxy_answers_wrong_methods_and_media_types(
    live: Live, method: str, content_type: str, status: int
) -> None:
    before = len(live.upstream.recorded)
    result = live.proxy.request(method, CHAT, msgs(USER), {"content-type": content_type})
    assert result.status == status, result.body
    error = result.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == {405: "method_not_allowed", 415: "unsupported_media_type"}[status]
    assert len(live.upstream.recorded) == before
