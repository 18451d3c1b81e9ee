"""The append-only layout: a base snapshot at commit B, then one block per commit from B to HEAD.

A prefix cache keeps only the bytes before the first difference. A snapshot rebuilt per commit
differs from the first changed file on; here a new commit only appends a block, so everything
before it stays cached. The base moves rarely, by a rule that depends on nothing but HEAD's
first-parent history and the settings, so every replica and every restart agrees on the bytes:

1. Let d be HEAD's first-parent depth (commits before it on the first-parent chain) and E the
   setting ``base_every_commits``. The candidate base is HEAD's first-parent ancestor at depth
   ``d - d % E``: the base moves once every E commits.
2. If the tail (the blocks from the candidate base to HEAD) is larger than ``max_tail_percent``
   of the candidate base's files, or, with a context window, its tokens take more than
   ``max_tail_percent`` of message 1's share of the window (the base is fitted to the rest, see
   ``tail_share``), the rule is tried again with E halved (E/2, E/4, ... 1; at E = 1 the base is
   HEAD and the tail is empty).

Each block holds the commit's message and its changes against its first parent: a patch, or
with ``history_full_files`` the full new text of each changed file. Following the first-parent
chain, the base plus the blocks is exactly HEAD's content (merges, rebases, branch switches and
force-pushes only change which chain that is), within the same exclusions and size limits as
the snapshot.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..git.commits import first_parent_depth, first_parent_line
from ..git.repo import GitRepo
from .blocks import BlockRenderer
from .fit import BLOCK_SLACK_TOKENS, WindowBudget
from .repobuilds import RepositoryBuilds
from .snapshot import SnapshotContent, SnapshotLimits, select_entries
from .tokens import utf8_length

KEPT_BLOCKS = 4096
KEPT_DEPTHS = 4096
KEPT_CHAINS = 8
# A new HEAD's depth is found from a known commit at most this many first-parent steps back
# (counting the whole chain costs 0.2 s on git/git's 80k commits without a commit-graph).
DEPTH_LOOKBACK = 64


@dataclass(frozen=True)
class HistoryLimits:
    """The settings the layout depends on; with SnapshotLimits, part of every cache key."""

    base_every_commits: int
    max_tail_percent: int
    full_files: bool


@dataclass(frozen=True)
class Tail:
    base: str
    commits: tuple[str, ...]
    blocks: tuple[str, ...]
    tokens: int = 0  # the blocks' tokens as the budget counts them (0 without a budget)
    redacted: int = 0  # secrets redacted in the blocks


def tail_share(budget: WindowBudget, limits: HistoryLimits) -> tuple[WindowBudget, int]:
    """Message 1's share split: the budget the base is fitted to, and the tokens the tail may take."""
    tail_tokens = budget.tokens * limits.max_tail_percent // 100
    return replace(budget, tokens=budget.tokens - tail_tokens), tail_tokens


class History:
    """Renders and caches commit blocks and picks the base for a HEAD (blocking: run in a thread)."""

    def __init__(
        self,
        repo: GitRepo,
        snapshot_limits: SnapshotLimits,
        limits: HistoryLimits,
        builds: RepositoryBuilds | None = None,
    ) -> None:
        self.repo = repo
        self.builds = builds  # blocks, depths and base sizes kept on disk across restarts
        self._renderer = BlockRenderer(repo, snapshot_limits, limits.full_files)
        self.snapshot_limits = snapshot_limits
        self.limits = limits
        self._blocks: OrderedDict[str, str] = OrderedDict()
        self._depths: OrderedDict[str, int] = OrderedDict()
        self._kept_depths: set[str] = set()  # commits whose depth is on disk (one every DEPTH_LOOKBACK / 2)
        self._base_bytes: dict[str, int] = {}
        self.redacted: dict[str, int] = {}  # commit -> secrets redacted in its block
        self._lock = threading.Lock()  # two HEADs may be worked out at once, in two threads
        self._chains: OrderedDict[str, tuple[list[str], int]] = OrderedDict()
        self._chain_lock = threading.Lock()

    def first_candidate(self, head: str) -> str:
        """The base the rule tries first for ``head`` (the tail may move it closer): known before
        any block is rendered, so its snapshot can be built while they are."""
        line, depth = self._chain(head)
        return line[depth % self.limits.base_every_commits]

    def tail_for(self, head: str, budget: WindowBudget | None = None) -> Tail:
        """The base and the tail for ``head``, by the rule in the module docstring (may ask the tokenizer)."""
        with self._lock:
            return self._tail_for(head, budget)

    def _chain(self, head: str) -> tuple[list[str], int]:
        """``head`` and its recent first-parent ancestors (newest first), and its depth; cached per head."""
        with self._chain_lock:
            if head not in self._chains:
                line = first_parent_line(self.repo, head, max(self.limits.base_every_commits, DEPTH_LOOKBACK) + 1)
                self._chains[head] = (line, self._depth(line))
                while len(self._chains) > KEPT_CHAINS:
                    self._chains.popitem(last=False)
            return self._chains[head]

    def _tail_for(self, head: str, budget: WindowBudget | None) -> Tail:
        every = self.limits.base_every_commits
        line, depth = self._chain(head)
        self._render_missing(list(reversed(line[: depth % every])))  # the commits after the first base tried
        while True:
            steps = depth % every
            base = line[steps]
            commits = tuple(reversed(line[:steps]))
            blocks = tuple(self.block(commit) for commit in commits)
            tail_bytes = sum(utf8_length(block) for block in blocks)
            tokens = self._tail_tokens(blocks, tail_bytes, budget)
            fits_window = tokens is not None
            if every == 1 or (fits_window and tail_bytes * 100 <= self.limits.max_tail_percent * self.base_bytes(base)):
                return Tail(base, commits, blocks, tokens or 0, sum(self.redacted.get(c, 0) for c in commits))
            every //= 2

    def _depth(self, line: list[str]) -> int:
        """The first-parent depth of ``line[0]``: from a known commit in ``line`` if there is one."""
        head = line[0]
        depth = self._known_depth(line)
        if depth is None:
            depth = first_parent_depth(self.repo, head)
        if self.builds is not None and not self._kept_depths.intersection(line[: DEPTH_LOOKBACK // 2]):
            # One depth on disk every DEPTH_LOOKBACK / 2 commits: a restart finds one within its lookback.
            self.builds.save_depth(head, depth)
            self._kept_depths.add(head)
        self._depths[head] = depth
        self._depths.move_to_end(head)
        while len(self._depths) > KEPT_DEPTHS:
            self._depths.popitem(last=False)
        return depth

    def _known_depth(self, line: list[str]) -> int | None:
        """From the nearest commit of ``line`` whose depth is known in memory, else on disk."""
        recent = line[: DEPTH_LOOKBACK + 1]
        for steps, commit in enumerate(recent):
            if commit in self._depths:
                return self._depths[commit] + steps
        if self.builds is not None:
            for steps, commit in enumerate(recent):
                depth = self.builds.depth(commit)
                if depth is not None:
                    self._kept_depths.add(commit)
                    return depth + steps
        return None

    def _tail_tokens(self, blocks: Sequence[str], tail_bytes: int, budget: WindowBudget | None) -> int | None:
        """The tail's tokens (0 without a budget); None when they take more than the tail's share."""
        if budget is None:
            return 0
        _, allowed = tail_share(budget, self.limits)
        slack = BLOCK_SLACK_TOKENS * len(blocks)
        if tail_bytes + slack <= allowed:
            return tail_bytes + slack  # the byte bound
        tokens = sum(budget.measure.count(blocks)) + slack
        return tokens if tokens <= allowed else None

    def base_bytes(self, commit: str) -> int:
        """The size of the files a snapshot of ``commit`` includes (from the tree's sizes: no reads)."""
        if commit not in self._base_bytes:
            size = self.builds.base_size(commit) if self.builds is not None else None
            if size is None:
                entries = select_entries(self.repo.ls_tree(commit), self.snapshot_limits, SnapshotContent())
                size = min(sum(entry.size or 0 for entry in entries), self.snapshot_limits.max_snapshot_bytes)
                if self.builds is not None:
                    self.builds.save_base_size(commit, size)
            self._base_bytes[commit] = size
        return self._base_bytes[commit]

    def block(self, commit: str) -> str:
        if commit not in self._blocks:
            self._render_missing([commit])
        self._blocks.move_to_end(commit)
        return self._blocks[commit]

    def _render_missing(self, commits: Sequence[str]) -> None:
        """Render the blocks not cached yet, all from one ``commit_diffs`` call (a few git processes)."""
        missing = [commit for commit in commits if commit not in self._blocks and not self._restored(commit)]
        for commit, block, redacted in self._renderer.render(missing):
            self._blocks[commit], self.redacted[commit] = block, redacted
            if self.builds is not None:
                self.builds.save_block(commit, block, redacted)
        while len(self._blocks) > KEPT_BLOCKS:
            self._blocks.popitem(last=False)

    def _restored(self, commit: str) -> bool:
        """Whether the commit's block was read back from disk (then it is cached in memory too)."""
        found = self.builds.block(commit) if self.builds is not None else None
        if found is None:
            return False
        self._blocks[commit], self.redacted[commit] = found
        return True
