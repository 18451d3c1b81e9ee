"""Fitting message 1 and each request into the model's context window (issue 12), without a server.

Real repositories in temp dirs, read through GitRepo and the provider; tokens counted by a
deterministic rule (one token per byte, like the tiny test models), so every figure is exact.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable

import pytest

from scout_diff_cache.chat.errors import ApiError
from scout_diff_cache.chat.fit import Fit, Window, fit_request
from scout_diff_cache.chat.request import parse_chat_request
from scout_diff_cache.context.fit import WindowBudget
from scout_diff_cache.context.history import HistoryLimits
from scout_diff_cache.context.outline import outline_text
from scout_diff_cache.context.provider import ContextProvider
from scout_diff_cache.context.snapshot import PREAMBLE, SnapshotLimits, append_preamble, build_snapshot
from scout_diff_cache.context.tiers import (
    TIER_BUILD,
    TIER_DATA,
    TIER_DOCS,
    TIER_FIRST,
    TIER_SOURCE,
    TIER_TESTS,
    reference_counts,
    tier_of,
)
from scout_diff_cache.context.tokens import BytesPerTokenRule
from scout_diff_cache.context.workdiff import DiffLimits, WorkingDiff, build_working_diff
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from scout_diff_cache.git.watcher import ChangeMonitor
from support import Repo

FILTER = PathFilter.build([], True)
LIMITS = SnapshotLimits(100_000, 10_000_000, FILTER)
ONE_PER_BYTE = BytesPerTokenRule(1.0)


def module(name: str, functions: int = 40) -> str:
    lines = [f'"""The {name} module."""\n']
    for i in range(functions):
        lines.append(f'def {name}_f{i}(x):\n    """Return x times {i}."""\n    return x * {i} + {len(name)}\n\n')
    return "".join(lines)


def big_repo_files() -> dict[str, str]:
    """About 60 KB: source (core.py used everywhere), tests, docs, data and a vendored copy."""
    files = {f"src/pkg/mod{i}.py": "from pkg import core\n" + module(f"mod{i}") for i in range(8)}
    files["src/pkg/core.py"] = module("core", 20)
    files["src/pkg/rarely.py"] = module("rarely", 20)
    files.update({f"tests/test_mod{i}.py": module(f"test_mod{i}", 20) for i in range(4)})
    files["docs/guide.md"] = "# Guide\n" + "Words about the project.\n" * 300
    files["data/table.csv"] = "a,b,c\n" * 1500
    files["vendor/lib.py"] = module("vendored", 30)
    files["pyproject.toml"] = '[project]\nname = "pkg"\n'
    return files


def paths_in(text: str, tag: str) -> list[str]:
    return re.findall(rf'^<{tag} path="([^"]+)"', text, flags=re.MULTILINE)


# --- tiers, references, outlines ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "tier"),
    [
        ("src/app/server.py", TIER_SOURCE),
        ("lib/index.ts", TIER_SOURCE),
        ("Makefile", TIER_BUILD),
        ("pyproject.toml", TIER_BUILD),
        (".github/workflows/ci.yml", TIER_BUILD),
        ("tests/test_server.py", TIER_TESTS),
        ("pkg/server_test.go", TIER_TESTS),
        ("web/app.spec.ts", TIER_TESTS),
        ("README.md", TIER_DOCS),
        ("docs/conf.py", TIER_DOCS),
        ("LICENSE", TIER_DOCS),
        ("vendor/github.com/x/y.go", TIER_DATA),
        ("fixtures/users.json", TIER_DATA),
        ("static/app.min.js", TIER_DATA),
        ("api/service_pb2.py", TIER_DATA),
        ("data.csv", TIER_DATA),
    ],
)
def test_each_path_has_its_tier(path: str, tier: int) -> None:
    assert tier_of(path.encode()) == tier


def test_include_first_comes_before_every_tier() -> None:
    first = PathFilter(("docs/important.md", "vendor/keep/"))
    assert tier_of(b"docs/important.md", first) == TIER_FIRST
    assert tier_of(b"vendor/keep/a.go", first) == TIER_FIRST
    assert tier_of(b"vendor/other/a.go", first) == TIER_DATA


def test_references_count_the_other_files_that_name_a_file() -> None:
    counts = reference_counts(
        {
            b"pkg/retry.py": "def retry(): pass\n",
            b"pkg/a.py": "from pkg.retry import retry\n",
            b"pkg/b.py": "import pkg.retry as retry\n",
            b"pkg/c.py": "retrying = 1  # not the name\n",
            b"pkg/utils.py": "utils are too common a name\n",
        }
    )
    assert counts[b"pkg/retry.py"] == 2  # a.py and b.py; its own mention does not count
    assert counts[b"pkg/utils.py"] == 0


def test_outlines_keep_signatures_and_docstrings_not_bodies() -> None:
    source = (
        b'class Store:\n    """Keeps things."""\n\n    def put(self, key, value):\n        secret_body = 1\n'
        b"        return key\n\n\ndef helper(a,\n           b):\n    return a + b\n"
    )
    outline = outline_text(b"store.py", source)
    assert outline is not None
    assert "class Store: ..." in outline
    assert '"""Keeps things."""' in outline
    assert "def put(self, key, value): ..." in outline
    assert "def helper(a," in outline and "b): ..." in outline
    assert "secret_body" not in outline
    js = outline_text(b"a.ts", b"export function run(x: number): number {\n  return x * 2;\n}\n")
    assert js == "export function run(x: number): number ...\n"
    assert outline_text(b"notes.txt", b"plain text") is None


# --- message 1 fitted to its share ----------------------------------------------------------------


def test_a_repository_that_fits_keeps_the_bytes_it_had_without_a_budget(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo(big_repo_files())
    git_repo = GitRepo(str(repo.path))
    plain = build_snapshot(git_repo, repo.head(), LIMITS)
    fitted = build_snapshot(git_repo, repo.head(), LIMITS, budget=WindowBudget(1_000_000, ONE_PER_BYTE))
    assert fitted.message_json == plain.message_json
    assert fitted.fit is not None and not fitted.fit.cut
    assert fitted.planned_tokens is not None and fitted.planned_tokens >= len(plain.text.encode())


def test_a_repository_three_times_its_share_is_cut_to_fit(make_repo: Callable[..., Repo]) -> None:
    files = big_repo_files()
    repo = make_repo(files)
    git_repo = GitRepo(str(repo.path))
    total = sum(len(text) for text in files.values())
    budget = WindowBudget(total // 3, ONE_PER_BYTE)
    snapshot = build_snapshot(git_repo, repo.head(), LIMITS, budget=budget)
    text = snapshot.text
    assert len(text.encode()) <= budget.tokens  # one token per byte: the plan holds
    assert snapshot.fit is not None and snapshot.fit.cut
    assert snapshot.planned_tokens is not None and len(text.encode()) <= snapshot.planned_tokens <= budget.tokens
    full, outlined = paths_in(text, "file"), paths_in(text, "outline")
    assert full == sorted(full) and outlined == sorted(outlined)  # rendering stays in path order
    assert "src/pkg/core.py" in full  # the most referenced source file
    assert not any(path.startswith(("tests/", "vendor/", "data/")) for path in full)
    assert outlined  # some source files are outlined ...
    for path in outlined:
        block = text[text.index(f'<outline path="{path}"') :]
        assert "def " in block.split("</outline>")[0] and "return x" not in block.split("</outline>")[0]
    # ... and everything left out is named at the end, with its tokens
    info = text[text.index("<snapshot_info>") :]
    assert "files omitted to fit the context window" in info
    for path in files:  # by path, or counted in its folder's line
        assert path in full or path in outlined or path in info or f"{path.rsplit('/', 1)[0]}/ (" in info, path


def test_include_first_is_kept_in_full(make_repo: Callable[..., Repo]) -> None:
    files = big_repo_files()
    repo = make_repo(files)
    git_repo = GitRepo(str(repo.path))
    budget = WindowBudget(15_000, ONE_PER_BYTE, PathFilter(("tests/test_mod3.py", "docs/")))
    text = build_snapshot(git_repo, repo.head(), LIMITS, budget=budget).text
    full = paths_in(text, "file")
    assert "tests/test_mod3.py" in full and "docs/guide.md" in full
    assert "tests/test_mod0.py" not in full


def test_the_plan_is_the_same_in_every_process(
    make_repo: Callable[..., Repo], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Same commit, settings, window and tokenizer: the same bytes, in a clone elsewhere too."""
    repo = make_repo(big_repo_files())
    clone = repo.clone(tmp_path_factory.mktemp("elsewhere") / "clone")
    budget = WindowBudget(20_000, ONE_PER_BYTE)
    first = build_snapshot(GitRepo(str(repo.path)), repo.head(), LIMITS, append_preamble(repo.head()), budget)
    second = build_snapshot(GitRepo(str(clone.path)), clone.head(), LIMITS, append_preamble(clone.head()), budget)
    assert first.message_json == second.message_json
    assert first.fit is not None and first.fit.cut


def test_listings_are_grouped_when_naming_every_file_would_not_fit(make_repo: Callable[..., Repo]) -> None:
    files = {f"gen/part{i:04d}/file{i:04d}.py": f"value_{i} = {i}\n" * 30 for i in range(400)}
    repo = make_repo(files)
    snapshot = build_snapshot(GitRepo(str(repo.path)), repo.head(), LIMITS, PREAMBLE, WindowBudget(8_000, ONE_PER_BYTE))
    text = snapshot.text
    assert len(text.encode()) <= 8_000
    info = text[text.index("<snapshot_info>") :]
    assert "files omitted to fit the context window" in info
    assert "gen/part0399/file0399.py" not in info  # too many to name one by one ...
    assert "gen/" in info  # ... so they are counted per folder


async def test_the_history_tail_counts_against_the_share_and_moves_the_base(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo(big_repo_files())
    git_repo = GitRepo(str(repo.path))
    provider = ContextProvider(
        git_repo,
        ChangeMonitor(git_repo.toplevel, [git_repo.git_dir]),
        LIMITS,
        DiffLimits(100_000, 1_000_000, FILTER),
        history_limits=HistoryLimits(128, 10, True),
    )
    budget = WindowBudget(30_000, ONE_PER_BYTE)
    first = await provider.snapshot(repo.head(), budget)
    repo.write({"src/pkg/new.py": module("new", 5)})
    small = repo.commit_all("a small commit")
    appended = await provider.snapshot(small, budget)
    assert appended.base_commit == first.commit and appended.tail_commits == 1
    assert appended.message_json.startswith(first.message_json[:-2])  # the base's bytes kept: appended
    repo.write({"src/pkg/huge.py": module("huge", 60)})  # about 5k tokens: more than 10% of the share
    big = repo.commit_all("a large commit")
    moved = await provider.snapshot(big, budget)
    assert moved.base_commit == big and moved.tail_commits == 0
    assert moved.planned_tokens is not None and len(moved.text.encode()) <= moved.planned_tokens <= budget.tokens
    await asyncio.sleep(0)


# --- a request fitted to the window -----------------------------------------------------------------


def chat(content: str, **fields: object) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}], **fields}).encode()


def fit(window: Window, diff: WorkingDiff, body: bytes) -> Fit:
    """A request with message 1 at 1000 tokens, one token per byte, 100 kept for the answer."""
    return fit_request(
        window,
        1_000,
        diff,
        parse_chat_request(body),
        client_bytes=len(body),
        reserve=100,
        measure=ONE_PER_BYTE,
        count_chat=None,
    )


def test_the_diff_is_cut_first_then_the_proxy_answers_400(make_repo: Callable[..., Repo]) -> None:
    repo = make_repo({"a.py": "a = 1\n", "b.py": "b = 1\n", "c.py": "c = 1\n"})
    repo.write({"a.py": "a = 2\n" * 100, "b.py": "b = 2\n" * 100, "c.py": "c = 2\n" * 100})
    git_repo = GitRepo(str(repo.path))
    diff = build_working_diff(git_repo, repo.head(), DiffLimits(100_000, 1_000_000, FILTER))
    window = Window(8_000, "test")
    fits = fit(window, diff, chat("hi"))
    assert not fits.diff_cut and fits.diff is diff

    cut = fit(window, diff, chat("x" * 4_500))
    assert cut.diff_cut and cut.total <= window.tokens
    assert cut.diff.included_files < diff.included_files
    assert "left out so the request fits the model's context window of 8000 tokens" in cut.diff.text
    assert "c.py" in cut.diff.text.split("left out so the request fits")[1]  # named, in path order

    with pytest.raises(ApiError) as refused:
        fit(window, diff, chat("x" * 7_000))
    assert refused.value.status == 400 and refused.value.code == "context_length_exceeded"
    assert "over" in refused.value.message and "8000" in refused.value.message

    with pytest.raises(ApiError) as answer_too_long:
        fit(window, diff, chat("hi", max_tokens=7_500))
    assert "max_tokens" in answer_too_long.value.message
