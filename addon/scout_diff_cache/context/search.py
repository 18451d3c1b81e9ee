"""A search index over the files message 1 left out: exact mentions first, then BM25.

Postings are kept per *word* (``terms.py``), not per term: indexing a file is one count of its
words, one id lookup per distinct word (in C) and a sort of all postings at the end (numpy);
only a word seen for the first time is split into terms. A term's postings are the union of the
postings of the words it is part of, gathered at query time.

Updating is in O(changed files), as in Lucene: the files added since the last *segment* (a
sorted run of postings) make a new small segment; a changed or removed file's slot is marked
dead and skipped. Segments merge when the small ones pass an eighth of the first, and slots are
renumbered when the dead outnumber the live, both from the word counts kept per file (no
re-reading, no re-tokenizing). Scores use only the live files' statistics, in integers until
the last step, so the ranking for a question depends on the files alone, not on the order they
were added, replaced or merged in.
"""

from __future__ import annotations

import math
import re
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from .terms import (
    MAX_WORD_BYTES,
    MIN_TERM_BYTES,
    path_mentions,
    path_words,
    question_terms,
    question_words,
    split_words,
    word_counts,
)

K1 = 1.2
B = 0.75
PATH_WEIGHT = 3  # a path's words count this many times: a file about "retry" is likely named so
MAX_QUERY_TERMS = 48  # a long question (tool results) is searched by its rarest terms
MAX_RESULTS = 8  # files ranked by score (mentions come on top of these)
SCORE_FLOOR = 0.35  # a scored file must reach this share of the best score: no filling up with noise
MENTION_MAX_FILES = 3  # a name or file name that more files match is not an exact mention
MAX_MENTIONS = 32  # path-like strings, and code-like names, looked up per question
DEFINERS_LOOKED_AT = 16  # a word in more left-out files than this is too common to be a definition's name
MERGE_FRACTION = 8  # later segments are merged into one when their postings pass 1/8 of the first's
_IDENTIFIER_LIKE = re.compile(rb"[A-Za-z_]\w*(?:_|[a-z][A-Z]|[0-9])\w*|[A-Z]\w*[a-z]\w*[A-Z]\w*")

_MODIFIERS = (
    r"(?:(?:export|pub(?:\([^)]*\))?|async|static|public|private|protected|internal|abstract|final|inline|"
    r"extern|unsafe|default|override|virtual|open|sealed|data|partial|const)\s+)*"
)
_KEYWORDS = (
    r"(?:def|class|function\*?|func(?:\s*\([^)]*\))?|fn|struct|enum|interface|trait|type|module|union|typedef"
    r"(?:\s+\w+)*?|record|object|impl|let|const|var|val|#\s*define|macro_rules!|sub|procedure|message|service)"
)
# Lines that define a name (group 1), in most languages: a keyword before it, an assignment at
# the start of a line (module constants), or a C-like function head (a type, the name, "(").
_DEFINITIONS = (
    re.compile(rf"\s*{_MODIFIERS}{_KEYWORDS}\s+[*&]*(\w+)".encode()),
    re.compile(rb"\s*(?:[A-Za-z_]\w*\.)?(\w+)\s*(?::[^=\n]*)?=[^=]"),
    re.compile(rb"[A-Za-z_][\w \t*&:<>,]*?[\s*&](\w+)\s*\([^;]*$"),
)


_WHOLE_TEXT_DEFINITIONS = (
    re.compile(rb"(?m)^" + _DEFINITIONS[0].pattern),
    re.compile(rb"(?m)^" + _DEFINITIONS[2].pattern.replace(rb"[^;]*$", rb"[^;\n]*$")),
)


def definitions(content: bytes) -> set[bytes]:
    """The names ``content`` defines with a keyword or as a C-like function (for the files in full)."""
    return {match.group(1) for pattern in _WHOLE_TEXT_DEFINITIONS for match in pattern.finditer(content)}


def defines(content: bytes, name: bytes) -> bool:
    """Whether a line of ``content`` defines ``name`` (looked for only where the name occurs)."""
    start = content.find(name)
    for _ in range(256):  # a name in more lines than this is used, not just defined: the first ones decide
        if start < 0:
            return False
        line_start = content.rfind(b"\n", 0, start) + 1
        line_end = content.find(b"\n", start)
        line = content[line_start : line_end if line_end >= 0 else len(content)]
        if any((match := pattern.match(line)) and match.group(1) == name for pattern in _DEFINITIONS):
            return True
        start = content.find(name, line_end) if line_end >= 0 else -1
    return False


def names_code(word: bytes, question: str) -> bool:
    """An identifier, not an English word: snake_case, camelCase, a digit, or `quoted`/called()."""
    if _IDENTIFIER_LIKE.fullmatch(word):
        return True
    text = word.decode("utf-8", "replace")
    return f"`{text}" in question or f"{text}(" in question


@dataclass(frozen=True)
class Hit:
    """A file found for a question, and why: "path named", "defines NAME" or "score 7.4"."""

    path: bytes
    reason: str
    score: float


def _ranges(starts: np.ndarray, words: np.ndarray) -> np.ndarray:
    """The positions of the given words' postings in a segment: starts[w]:starts[w + 1] for each, joined."""
    words = words[words < len(starts) - 1]
    low, high = starts[words], starts[words + 1]
    sizes = high - low
    total = int(sizes.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    return np.repeat(low - np.cumsum(sizes) + sizes, sizes) + np.arange(total)


class Segment:
    """The postings of some files, sorted by word id: for word w, ``slots[starts[w]:starts[w + 1]]``."""

    def __init__(self, slots: list[int], forward: list[tuple[np.ndarray, np.ndarray]], words: int) -> None:
        files = [forward[slot] for slot in slots]
        ids = np.concatenate([file[0] for file in files]) if files else np.zeros(0, dtype=np.int64)
        counts = np.concatenate([file[1] for file in files]) if files else np.zeros(0, dtype=np.int64)
        owners = np.repeat(np.asarray(slots, dtype=np.int64), [len(file[0]) for file in files])
        order = np.argsort(ids, kind="stable")
        self.slots, self.counts = owners[order], counts[order]
        self.starts = np.zeros(words + 1, dtype=np.int64)
        np.cumsum(np.bincount(ids, minlength=words), out=self.starts[1:])

    def __len__(self) -> int:
        return len(self.slots)

    def postings(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions = _ranges(self.starts, words)
        return self.slots[positions], self.counts[positions]


class SearchIndex:
    """The left-out files at one commit, searchable; blocking (build and query it off the event loop)."""

    def __init__(self, commit: str, defined_in_context: frozenset[bytes] = frozenset()) -> None:
        self.commit = commit
        # Names that a file in full in message 1 defines: naming one is no reason to retrieve a file.
        self.defined_in_context = defined_in_context
        self.vocabulary: dict[bytes, int] = {}  # word -> id
        self.weights = array("q")  # word id -> how many terms the word stands for
        # term -> ids of the words split into it; arrays, not lists: no int objects, nothing for the GC to scan
        self.term_words: dict[bytes, array[int]] = {}
        self.paths: list[bytes] = []
        self.oids: list[str] = []
        self.contents: list[bytes] = []  # b"" for a dead slot
        self.forward: list[tuple[np.ndarray, np.ndarray]] = []  # slot -> its word ids and their counts
        self.lengths: list[int] = []  # slot -> its terms, counted with repeats
        self.slot_of: dict[bytes, int] = {}  # live files only
        self.total_length = 0
        self.segments: list[Segment] = []
        self.pending: list[int] = []  # slots not in a segment yet
        self._by_name: dict[bytes, list[bytes]] | None = None  # derived: reset when the files change
        self._live_slots: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.slot_of)

    @property
    def indexed_bytes(self) -> int:
        return sum(len(self.contents[slot]) for slot in self.slot_of.values())

    def oid_of(self, path: bytes) -> str | None:
        slot = self.slot_of.get(path)
        return None if slot is None else self.oids[slot]

    def file(self, path: bytes) -> tuple[str, bytes]:
        """An indexed file's blob id and content."""
        slot = self.slot_of[path]
        return self.oids[slot], self.contents[slot]

    def add(self, path: bytes, oid: str, content: bytes) -> None:
        """Index one file (replacing an indexed file of the same path); searchable after ``seal``."""
        self.remove(path)
        counts = word_counts(content)
        for word in path_words(path):
            counts[word] += PATH_WEIGHT
        vocabulary = self.vocabulary
        new = [word for word in counts if word not in vocabulary]
        if new:
            self._register(new)
        ids = np.fromiter(map(vocabulary.__getitem__, counts), dtype=np.int64, count=len(counts))
        frequencies = np.fromiter(counts.values(), dtype=np.int64, count=len(counts))
        length = int((np.frombuffer(self.weights, dtype=np.int64)[ids] * frequencies).sum()) if len(ids) else 0
        slot = len(self.paths)
        self.paths.append(path)
        self.oids.append(oid)
        self.contents.append(content)
        self.forward.append((ids, frequencies))
        self.lengths.append(length)
        self.slot_of[path] = slot
        self._by_name = self._live_slots = None
        self.total_length += length
        self.pending.append(slot)

    def _register(self, words: list[bytes]) -> None:
        """New words: ids, and their terms learn them; a word spelt like its term (most are) is not listed.

        This is hot: most words (lowercase, no underscore) are not split at all (``words_of``).
        """
        start = len(self.weights)
        self.vocabulary.update(zip(words, range(start, start + len(words)), strict=True))
        lowered = b"\n".join(words).lower().split(b"\n")
        others = [
            index
            for index, (word, low) in enumerate(zip(words, lowered, strict=True))
            if word != low or b"_" in word or not MIN_TERM_BYTES <= len(word) <= MAX_WORD_BYTES
        ]
        self.weights.extend(repeat(1, len(words)))  # a plain word is one term; the others are set below
        term_words, weights = self.term_words, self.weights
        for index, terms in zip(others, split_words([words[index] for index in others]), strict=True):
            word_id, word = start + index, words[index]
            weights[word_id] = len(terms)
            for term in terms:
                if term == word:
                    continue  # found through the vocabulary
                ids = term_words.get(term)
                if ids is None:
                    term_words[term] = array("q", (word_id,))
                else:
                    ids.append(word_id)

    def words_of(self, term: bytes) -> list[int]:
        """The ids of the words that stand for ``term``: the one spelt like it (its own split gives it
        back), and the words split into it."""
        found = self.term_words.get(term, ())
        word_id = self.vocabulary.get(term)
        return [word_id, *found] if word_id is not None else list(found)

    def remove(self, path: bytes) -> None:
        slot = self.slot_of.pop(path, None)
        if slot is None:
            return
        self._by_name = self._live_slots = None
        self.contents[slot] = b""
        empty = np.zeros(0, dtype=np.int64)
        self.forward[slot] = (empty, empty)
        self.total_length -= self.lengths[slot]

    def seal(self) -> None:
        """Make the files added since the last call searchable: a new segment, merged or renumbered if due."""
        if len(self.paths) > 2 * max(len(self.slot_of), 64):
            self._renumber()
        if self.pending:
            self.segments.append(Segment(self.pending, self.forward, len(self.weights)))
            self.pending = []
        if len(self.segments) > 1 and sum(map(len, self.segments[1:])) * MERGE_FRACTION > len(self.segments[0]):
            self.segments = [Segment(sorted(self.slot_of.values()), self.forward, len(self.weights))]

    def _renumber(self) -> None:
        live = sorted(self.slot_of.values())
        self.paths = [self.paths[slot] for slot in live]
        self.oids = [self.oids[slot] for slot in live]
        self.contents = [self.contents[slot] for slot in live]
        self.forward = [self.forward[slot] for slot in live]
        self.lengths = [self.lengths[slot] for slot in live]
        self.slot_of = {path: slot for slot, path in enumerate(self.paths)}
        self._live_slots = None
        self.segments = []
        self.pending = list(range(len(self.paths)))

    def _counts(self, word_ids: list[int]) -> np.ndarray:
        """Per slot: how often the given words occur in the live file there (0 in a dead one)."""
        words = np.asarray(word_ids, dtype=np.int64)
        counts = np.zeros(len(self.paths))
        for segment in self.segments:
            slots, frequencies = segment.postings(words)
            counts += np.bincount(slots, weights=frequencies, minlength=len(self.paths))
        return counts  # a dead slot's word counts were emptied, but an old segment may still list it

    def search(self, question: str, skip: Iterable[bytes] = ()) -> list[Hit]:
        """The files for a question, best first: exact mentions, then BM25 above SCORE_FLOOR."""
        self.seal()
        skipped = set(skip)
        words = question_words(question)
        hits = [hit for hit in mentions(self, question, words) if hit.path not in skipped]
        chosen = {hit.path for hit in hits} | skipped
        scored = [hit for hit in self.scored(question_terms(words)) if hit.path not in chosen]
        return hits + scored

    def by_name(self) -> dict[bytes, list[bytes]]:
        """Live paths by file name (cached until the files change)."""
        if self._by_name is None:
            self._by_name = {}
            for path in sorted(self.slot_of):
                self._by_name.setdefault(path.rpartition(b"/")[2], []).append(path)
        return self._by_name

    def defining(self, word: bytes) -> list[bytes]:
        """The live files that define ``word``, if only a few contain it at all."""
        word_id = self.vocabulary.get(word)
        if word_id is None:
            return []
        slots = np.flatnonzero((self._counts([word_id]) > 0) & self._live())
        if not 0 < len(slots) <= DEFINERS_LOOKED_AT:
            return []
        return [self.paths[slot] for slot in slots if defines(self.contents[slot], word)]

    def _live(self) -> np.ndarray:
        """Per slot: whether a live file is there (cached until the files change; read-only)."""
        if self._live_slots is None:
            self._live_slots = np.zeros(len(self.paths), dtype=bool)
            self._live_slots[list(self.slot_of.values())] = True
        return self._live_slots

    def scored(self, terms: Sequence[bytes]) -> list[Hit]:
        """BM25 over the live files for the question's terms (its MAX_QUERY_TERMS rarest), best first."""
        live_count = len(self.slot_of)
        words = {term: found for term in terms if (found := self.words_of(term))}
        known = list(words)
        if not live_count or not known:
            return []
        # Rarest first by how many words carry the term: cheap, and exact enough to choose by.
        known.sort(key=lambda term: (len(words[term]), term))
        live = self._live()
        lengths = np.asarray(self.lengths, dtype=np.float64)
        norm = K1 * (1 - B + B * lengths / max(self.total_length / live_count, 1.0))
        scores = np.zeros(len(self.paths))
        for term in sorted(known[:MAX_QUERY_TERMS]):
            counts = self._counts(words[term])
            counts[~live] = 0
            frequency = int(np.count_nonzero(counts))
            if frequency:
                idf = math.log(1 + (live_count - frequency + 0.5) / (frequency + 0.5))
                scores += idf * counts * (K1 + 1) / (counts + norm)
        positive = np.flatnonzero(scores > 0)
        if len(positive) > MAX_RESULTS:  # the best MAX_RESULTS and every file tied with the last of them
            positive = positive[scores[positive] >= np.partition(scores[positive], -MAX_RESULTS)[-MAX_RESULTS]]
        order = sorted((-float(scores[slot]), self.paths[slot]) for slot in positive)
        floor = -order[0][0] * SCORE_FLOOR if order else 0.0
        return [Hit(path, f"score {-score:.1f}", -score) for score, path in order[:MAX_RESULTS] if -score >= floor]


def mentions(index: SearchIndex, question: str, words: Sequence[bytes]) -> list[Hit]:
    """Files whose path the question names, then files that alone define a name the question uses.

    At most MAX_MENTIONS of each are looked at (a long tool result must not cost seconds).
    """
    hits: dict[bytes, Hit] = {}
    for mention in path_mentions(question)[:MAX_MENTIONS]:
        name = mention.encode("utf-8", "surrogatepass")
        same_name = index.by_name().get(name.rpartition(b"/")[2], [])
        matching = [path for path in same_name if path == name or path.endswith(b"/" + name)]
        if 0 < len(matching) <= MENTION_MAX_FILES:
            for path in matching:
                hits.setdefault(path, Hit(path, "path named", math.inf))
    named = [word for word in words if word not in index.defined_in_context and names_code(word, question)]
    for word in named[:MAX_MENTIONS]:
        definers = index.defining(word)
        if 0 < len(definers) <= MENTION_MAX_FILES:
            reason = f"defines {word.decode('utf-8', 'replace')}"
            for path in sorted(definers):
                hits.setdefault(path, Hit(path, reason, math.inf))
    return list(hits.values())
