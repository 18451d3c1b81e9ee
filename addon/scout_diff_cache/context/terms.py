"""Search terms for finding left-out files: words of code and prose, identifiers split on case and underscores.

A file's text is cut into *words* at every byte that is not a letter, digit, underscore or part
of a UTF-8 sequence (one C-level translate and split, no regex over the text), and counted. A
word stands for its *terms*: its lowercased parts (``parseHTTPRequest`` → ``parse``, ``http``,
``request``; ``max_tokens`` → ``max``, ``tokens``) and, when it has several parts, the whole word
lowercased (``max_tokens``), so a question that names an identifier matches it best. Splitting
happens once per distinct word, never per occurrence.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

_WORD_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_") | frozenset(range(128, 256))
_TO_SPACE = bytes(byte if byte in _WORD_BYTES else 0x20 for byte in range(256))
_LOWER_UPPER = re.compile(rb"([a-z0-9])([A-Z])")  # parseHttp -> parse_Http
_ACRONYM_END = re.compile(rb"([A-Z])([A-Z][a-z])")  # HTTPRequest -> HTTP_Request
_PATH_LIKE = re.compile(r"[\w.\-/]*[./][\w.\-/]*\w")

MIN_TERM_BYTES = 2
MAX_WORD_BYTES = 64  # longer runs are data (base64, hashes, minified code), not names
# Left out of questions only (files keep them: inverse document frequency already weighs them down).
STOP_WORDS = frozenset(
    b"a an and are as at be been but by can could did do does doing for from had has have how i if in "
    b"into is it its me my no not of on or our please should so than that the their them then there "
    b"these they this those to us was we were what when where which while who why will with would you "
    b"your".split()
)


def word_counts(data: bytes) -> Counter[bytes]:
    """Every word of ``data`` with how often it occurs."""
    return Counter(data.translate(_TO_SPACE).split())


def path_words(path: bytes) -> list[bytes]:
    """The words of a path: ``src/http_client/RetryPolicy.java`` → src, http_client, RetryPolicy, java."""
    return [word for word in path.translate(_TO_SPACE).split() if len(word) <= MAX_WORD_BYTES]


def split_words(words: list[bytes]) -> list[tuple[bytes, ...]]:
    """Each word's terms: its lowercased parts, and the whole word lowercased when it has several.

    Parts are cut at underscores and where case changes (``parseHTTPRequest``: parse, http,
    request; digits stay with what they follow: ``sha256``). All words at once: two regex passes
    over them joined, then plain splits: this runs for every new word of a repository.
    """
    if not words:
        return []
    joined = _ACRONYM_END.sub(rb"\1_\2", _LOWER_UPPER.sub(rb"\1_\2", b"\n".join(words)))
    found: list[tuple[bytes, ...]] = []
    for word, cut in zip(words, joined.lower().split(b"\n"), strict=True):
        parts = [part for part in cut.split(b"_") if len(part) >= MIN_TERM_BYTES]
        if len(parts) > 1 and len(word) <= MAX_WORD_BYTES:
            whole = word.lower().strip(b"_")
            found.append((*parts, whole) if whole not in parts else tuple(parts))
        elif parts and len(word) <= MAX_WORD_BYTES:
            found.append((word.lower().strip(b"_"),))
        else:
            found.append(())
    return found


def split_word(word: bytes) -> tuple[bytes, ...]:
    return split_words([word])[0]


def question_terms(words: Iterable[bytes]) -> list[bytes]:
    """The distinct terms of a question's words, stop words left out, in first-seen order."""
    terms: dict[bytes, None] = {}
    for word in words:
        for term in split_word(word):
            if term not in STOP_WORDS:
                terms[term] = None
    return list(terms)


def question_words(text: str) -> list[bytes]:
    """The words of a question, in order, each once."""
    return list(dict.fromkeys(word_counts(text.encode("utf-8", "surrogatepass"))))


def path_mentions(text: str) -> list[str]:
    """What in a question looks like a path or a file name (``a/b.py``, ``tiers.py``, ``./x/``), each once."""
    found = (match.group().strip("./") for match in _PATH_LIKE.finditer(text))
    return list(dict.fromkeys(item for item in found if item))
