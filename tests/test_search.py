"""Retrieval's pure parts: terms, the search index, the question, fitting the found files (issue 14)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable

import pytest

from needles import DESCRIBED, NAMED, needle_files
from scout_diff_cache.chat.question import question_text
from scout_diff_cache.context.fit import FitReport, Omitted
from scout_diff_cache.context.retrieval import TEXT_START, Found, Retriever, build_index, fit_retrieved, update_index
from scout_diff_cache.context.search import MAX_MENTIONS, MAX_RESULTS, SearchIndex, defines, definitions
from scout_diff_cache.context.snapshot import Snapshot, SnapshotLimits
from scout_diff_cache.context.terms import path_mentions, question_terms, split_word
from scout_diff_cache.context.tokens import BytesPerTokenRule
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from support import Repo


@pytest.mark.parametrize(
    ("word", "terms"),
    [
        (b"parseHTTPRequest", (b"parse", b"http", b"request", b"parsehttprequest")),
        (b"max_tokens", (b"max", b"tokens", b"max_tokens")),
        (b"MAX_TOKENS", (b"max", b"tokens", b"max_tokens")),
        (b"__init__", (b"init",)),
        (b"Request", (b"request",)),
        (b"x", ()),
        (b"a" * 65, ()),  # data, not a name
    ],
)
def test_a_word_stands_for_its_parts_and_itself(word: bytes, terms: tuple[bytes, ...]) -> None:
    assert split_word(word) == terms


def test_questions_drop_stop_words_and_find_paths() -> None:
    assert question_terms([b"What", b"does", b"the", b"RetryPolicy", b"do"]) == [b"retry", b"policy", b"retrypolicy"]
    assert path_mentions("see src/net/retry.py and ./tiers.py, or e.g. nothing") == [
        "src/net/retry.py",
        "tiers.py",
        "e.g",
    ]


def index_of(files: dict[str, str], commit: str = "c1", in_context: frozenset[bytes] = frozenset()) -> SearchIndex:
    index = SearchIndex(commit, in_context)
    for path, text in files.items():
        index.add(path.encode(), f"oid-{path}-{hash(text)}", text.encode())
    index.seal()
    return index


FILES = {
    "net/retry.py": "def backoff_delay(attempt):\n    '''Exponential backoff between retries.'''\n",
    "net/client.py": "from net import retry\n\nclass HttpClient:\n    def send(self): pass\n",
    "billing/invoice.py": "def total(invoice):\n    '''Sum the invoice lines with tax.'''\n",
    "docs/retry.md": "# Retries\nThe client retries with exponential backoff.\n",
}


def test_a_name_the_question_uses_finds_the_one_file_that_defines_it() -> None:
    hits = index_of(FILES).search("Why does backoff_delay grow so fast?")
    assert (hits[0].path, hits[0].reason) == (b"net/retry.py", "defines backoff_delay")


def test_a_path_or_file_name_the_question_names_comes_first() -> None:
    hits = index_of(FILES).search("What is in invoice.py?")
    assert (hits[0].path, hits[0].reason) == (b"billing/invoice.py", "path named")


def test_plain_english_words_are_not_taken_for_names_but_still_score() -> None:
    hits = index_of({**FILES, "words.py": "def total():\n    pass\n"}).search("what is the total")
    assert all(not hit.reason.startswith("defines") for hit in hits)  # "total" is a word, not `total`
    assert index_of(FILES).search("what does `total` do")[0].reason == "defines total"


def test_a_name_defined_in_a_file_in_full_is_not_a_reason() -> None:
    hits = index_of(FILES, in_context=frozenset({b"backoff_delay"})).search("backoff_delay?")
    assert all(hit.reason != "defines backoff_delay" for hit in hits)


def test_lexical_ranking_finds_a_described_file_and_ignores_noise() -> None:
    hits = index_of(FILES).search("how are invoice lines summed with tax")
    assert hits[0].path == b"billing/invoice.py" and hits[0].reason.startswith("score ")
    assert index_of(FILES).search("the and of what") == []  # stop words only: nothing to search for


def test_skipped_files_are_not_found_again() -> None:
    hits = index_of(FILES).search("backoff_delay", skip=[b"net/retry.py"])
    assert b"net/retry.py" not in [hit.path for hit in hits]


def test_at_most_max_results_scored_files_above_a_floor_of_the_best() -> None:
    files = {f"m{i:03d}.py": f"def f{i}():\n    '''shared words here {i}'''\n" for i in range(50)}
    hits = index_of(files).search("shared words")
    assert 0 < len(hits) <= MAX_RESULTS and hits == sorted(hits, key=lambda hit: (-hit.score, hit.path))


def test_the_ranking_depends_on_the_files_not_on_the_order_they_were_added_changed_or_merged_in() -> None:
    files = needle_files(filler_modules=40)
    rng = random.Random(1)
    later = dict(rng.sample(sorted(files.items()), 15))
    changed = {path: text.replace("Return", "Give back") for path, text in later.items()}
    final = {**files, **changed}
    for path in list(final)[:5]:
        del final[path]
    fresh = index_of(final)
    updated = index_of(files)
    for path, text in changed.items():
        updated.add(path.encode(), "x", text.encode())
        updated.seal()  # one segment per change: merges and renumbering happen on the way
    for path in list(files)[:5]:
        updated.remove(path.encode())
    updated.seal()
    assert len(updated) == len(fresh)
    for needle in [*NAMED, *DESCRIBED]:
        for asked in (needle.named, needle.described):
            assert updated.search(asked) == fresh.search(asked)


def test_definitions_across_languages() -> None:
    assert defines(b"pub async fn fetch_all(x: u8) {", b"fetch_all")
    assert defines(b"export default class Parser {", b"Parser")
    assert (
        defines(b"static int\nparse_header(char *buf, size_t n)\n{", b"parse_header") is False
    )  # type on its own line
    assert defines(b"static int parse_header(char *buf, size_t n)\n{", b"parse_header")
    assert defines(b"MAX_RETRIES = 5\n", b"MAX_RETRIES")
    assert not defines(b"    return parse_header(buf, n);\n", b"parse_header")
    assert definitions(b"def a():\n    pass\nclass B:\n    pass\n") == {b"a", b"B"}


def test_the_question_is_the_latest_user_message_and_the_latest_tool_results() -> None:
    messages = [
        {"role": "user", "content": "old question"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": [{"type": "text", "text": "fix backoff_delay"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "stale result"},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "Traceback: net/retry.py line 3"},
    ]
    assert question_text(messages) == "fix backoff_delay\nTraceback: net/retry.py line 3"
    assert question_text([{"role": "system", "content": "be brief"}]) == ""


def found(path: str, size: int) -> Found:
    return Found(path.encode(), "oid", ("x = 1\n" * (size // 6)).encode(), "score 1.0")


def test_fitting_takes_files_in_rank_order_passes_over_one_too_large_and_names_it() -> None:
    measure = BytesPerTokenRule(1.0)
    retrieved = fit_retrieved([found("a.py", 600), found("big.py", 6000), found("b.py", 600)], 1800, measure, "c" * 40)
    assert retrieved is not None
    assert [item.path for item in retrieved.files] == [b"a.py", b"b.py"]
    assert [item.path for item, _ in retrieved.left_out] == [b"big.py"]
    text = json.loads(retrieved.message_json)["content"]
    assert text.startswith(TEXT_START) and text.index('path="a.py"') < text.index('path="b.py"')
    assert "left out for lack of room: big.py (6" in text and retrieved.tokens <= 1800
    assert fit_retrieved([found("big.py", 6000)], 1800, measure, "c" * 40) is None


def limits() -> SnapshotLimits:
    return SnapshotLimits(1 << 20, 1 << 30, PathFilter.build((), True))


class CountingRepo(GitRepo):
    """A GitRepo that records which blobs it was asked to read."""

    read: list[str]

    def read_blobs(self, oids):  # type: ignore[no-untyped-def]
        self.read = [*getattr(self, "read", []), *oids]
        return super().read_blobs(oids)


def test_a_new_commit_rereads_only_the_changed_left_out_files(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({**FILES, "kept.py": "def kept():\n    pass\n"})
    fit = FitReport(100, "estimate", 1000, cut=True, omitted=[Omitted(path.encode(), 10) for path in FILES])
    git = CountingRepo(str(repo.path))
    index = build_index(git, repo.head(), fit, {"kept.py"})
    assert len(index) == len(FILES) and b"kept.py" not in index.slot_of
    assert b"kept" in index.defined_in_context  # kept.py is in full: what it defines is no reason
    repo.write({"net/retry.py": "def backoff_delay(attempt):\n    '''Linear backoff now.'''\n", "new.py": "x = 1\n"})
    repo.git("rm", "-q", "docs/retry.md")
    head = repo.commit_all("linear")
    git.read = []
    update_index(git, index, head, {item.path for item in fit.omitted}, limits())
    assert len(git.read) == 1 and index.commit == head  # one blob: the changed left-out file
    assert b"docs/retry.md" not in index.slot_of and b"new.py" not in index.slot_of
    assert b"Linear backoff now" in index.file(b"net/retry.py")[1]


async def test_the_retriever_answers_index_building_until_its_build_is_done(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo(FILES)
    fit = FitReport(100, "estimate", 1000, cut=True, omitted=[Omitted(path.encode(), 10) for path in FILES])
    snapshot = Snapshot(repo.head(), b"{}", 0, 0, 0, fit=fit)
    retriever = Retriever(GitRepo(str(repo.path)), limits())
    assert (await retriever.lookup(snapshot, "backoff_delay")).status == "index building"
    assert retriever.state().status == "building"
    for _ in range(200):
        lookup = await retriever.lookup(snapshot, "backoff_delay")
        if lookup.status == "ready":
            break
        await asyncio.sleep(0.02)
    assert [item.path for item in lookup.found][:1] == [b"net/retry.py"]
    assert retriever.state().files == len(FILES)
    held = {b"net/retry.py": lookup.found[0].oid}
    again = await retriever.lookup(snapshot, "backoff_delay", held)
    assert b"net/retry.py" not in [item.path for item in again.found]  # held and unchanged: not again


def test_a_huge_question_is_searched_with_bounded_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool result of thousands of names and paths must not cost seconds per request (the lock is held)."""
    index = index_of(FILES)
    looked_up: list[bytes] = []
    real = SearchIndex.defining

    def counting(self: SearchIndex, word: bytes) -> list[bytes]:
        looked_up.append(word)
        return real(self, word)

    monkeypatch.setattr(SearchIndex, "defining", counting)
    flood = " ".join(f"name_{i} dir{i}/file_{i}.py" for i in range(5000)) + " backoff_delay"
    messages = [{"role": "user", "content": "why?"}, *({"role": "tool", "content": flood} for _ in range(20))]
    question = question_text(messages)
    assert len(question) <= 2 * 65536
    index.search(question)
    assert len(looked_up) <= MAX_MENTIONS
