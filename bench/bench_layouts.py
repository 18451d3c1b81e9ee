"""Prefix reuse of the snapshot message across commits, for three layouts, over a replayed history.

A prefix cache reuses only the bytes before the first difference. This replays the last
``--commits N`` first-parent commits of a repository (each against its first parent: N pairs)
and, for each pair, measures the share of the new commit's stable prompt part that is an
identical byte prefix of the previous commit's:

- per-commit:    build_snapshot(repo, commit) with PREAMBLE (files in path order, commit id at the end);
- commit-first:  the same snapshot with a header line ``commit: <id>`` before everything (a naive design);
- append:        History + the base snapshot with append_preamble(base) + with_history, as context.py does
                 (patch blocks); append+full: the same with history_full_files (full new texts).

Shares are of the JSON-encoded system message 1 (the snapshot), and of messages 1+2 (2: the working
diff as a clean checkout of that commit sends it), over the new commit's bytes. For the append
layouts also: the extra bytes against the per-commit message at the same commit (mean and max) and
how often the base moved. Shares are of bytes; tokens are not measured unless a tokenizer is
installed (it is not a dependency; the bench says which).

By default it generates a repository (deterministic, seeded; fixed commit dates through the Repo
helper of tests/support.py) in a temp dir, removed after: ``--files`` source-like files of 1-20 KB
(about 10 MB), a first-parent history of ``--history`` commits after the initial one: most touch 1-5
files, skewed to a few hot files (CHANGELOG.md and some core modules) but regularly a long-untouched
one, early in path order too; occasional adds, deletes and renames, a larger commit (20-50 files)
now and then, and two side branches merged with --no-ff. ``--repo PATH`` replays a real repository's
HEAD instead, read only through git plumbing (the object database): its work tree is not touched.

``--base-every`` and ``--max-tail-percent`` take one or more values; every combination gets its own
append rows. The goal line (printed, not asserted) per append row: mean shared prefix >= 97% over
>= 100 commits with mean extra bytes <= 5%.

Usage: .venv/bin/python bench/bench_layouts.py [--repo PATH] [--commits N] [--base-every E ...]
       [--max-tail-percent P ...] [--files F] [--history H] [--seed S]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from scout_diff_cache.context.framing import system_message_json
from scout_diff_cache.context.history import History, HistoryLimits
from scout_diff_cache.context.snapshot import (
    Snapshot,
    SnapshotLimits,
    append_preamble,
    build_snapshot,
    common_prefix_length,
    with_history,
)
from scout_diff_cache.context.workdiff import DiffLimits, DiffParts, render_working_diff
from scout_diff_cache.git.commits import first_parent_depth
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from scout_diff_cache.settings import Settings
from support import Repo

GOAL_SHARED_PERCENT = 97.0
GOAL_EXTRA_PERCENT = 5.0
GOAL_PAIRS = 100

# --- the generated repository ----------------------------------------------------------------------

PACKAGES = (
    "api", "auth", "billing", "cache", "cli", "config", "core", "db", "events", "http",
    "jobs", "mail", "models", "net", "plugins", "reports", "search", "storage", "sync", "web",
)  # fmt: skip
SIDE_PACKAGES = ("search", "sync")  # the side branches work there; main leaves them alone meanwhile
WORDS = (
    "value", "item", "result", "count", "index", "state", "config", "request", "response", "user",
    "record", "buffer", "cache", "entry", "token", "session", "handler", "payload", "limit", "offset",
    "parse", "load", "store", "check", "build", "render", "update", "merge", "fetch", "apply",
)  # fmt: skip
TOP_FILES = (".github/workflows/ci.yml", ".gitignore", "CHANGELOG.md", "Makefile", "README.md", "pyproject.toml")


def _name(rng: random.Random) -> str:
    return f"{rng.choice(WORDS)}_{rng.choice(WORDS)}"


def code_line(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return f"def {_name(rng)}({rng.choice(WORDS)}, {rng.choice(WORDS)}={rng.randrange(100)}):"
    if kind == 1:
        return f"    if {rng.choice(WORDS)} > {rng.randrange(1000)}:"
    if kind == 2:
        return f"        return {_name(rng)}({rng.choice(WORDS)}, {rng.choice(WORDS)})"
    if kind == 3:
        return f"    # {rng.choice(WORDS)} the {rng.choice(WORDS)} before the {_name(rng)}"
    if kind == 4:
        return f"    {rng.choice(WORDS)}.{_name(rng)}({rng.choice(WORDS)}[{rng.randrange(16)}])"
    if kind == 5:
        return ""
    return f"    {rng.choice(WORDS)} = {_name(rng)}({rng.choice(WORDS)}, {rng.randrange(10000)})"


def text_line(rng: random.Random) -> str:
    if rng.randrange(6) == 0:
        return ""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "."


def new_content(rng: random.Random, path: str) -> list[str]:
    size = int(min(20480, max(1024, rng.lognormvariate(8.9, 0.6))))
    make = code_line if path.endswith(".py") else text_line
    lines: list[str] = []
    total = 0
    while total < size:
        lines.append(make(rng))
        total += len(lines[-1]) + 1
    return lines


def edited(rng: random.Random, path: str, lines: list[str], hunks: int) -> list[str]:
    """``lines`` with ``hunks`` places changed: a few lines replaced by a few new ones."""
    make = code_line if path.endswith(".py") else text_line
    result = list(lines)
    for _ in range(hunks):
        if path == "CHANGELOG.md":  # new entries go near the top, under the heading
            at, removed = 2, 0
        else:
            at = rng.randrange(len(result) + 1)
            removed = min(rng.randint(0, 4), len(result) - at)
        added = [make(rng) for _ in range(rng.randint(1, 6))]
        result[at : at + removed] = added
    return result


@dataclass
class Generator:
    """Drives a Repo through a seeded history; ``trees`` holds each branch's files (path -> lines)."""

    repo: Repo
    rng: random.Random
    trees: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    branch: str = "main"
    blocked: tuple[str, ...] = ()  # path prefixes main leaves alone while a side branch is open
    serial: int = 0

    @property
    def tree(self) -> dict[str, list[str]]:
        return self.trees[self.branch]

    def populate(self, files: int) -> None:
        rng = self.rng
        paths = list(TOP_FILES)
        docs = max(1, files // 20)
        tests = max(1, files // 5)
        paths += [f"docs/{rng.choice(WORDS)}-{index:03d}.md" for index in range(docs)]
        modules = files - len(paths) - tests
        paths += [f"src/app/{PACKAGES[i % len(PACKAGES)]}/{_name(rng)}_{i:04d}.py" for i in range(modules)]
        paths += [f"tests/{PACKAGES[i % len(PACKAGES)]}/test_{_name(rng)}_{i:04d}.py" for i in range(tests)]
        self.trees = {"main": {path: new_content(rng, path) for path in paths}}
        self.repo.write({path: _joined(lines) for path, lines in self.tree.items()})
        self.repo.commit_all("initial import")
        ordered = sorted(self.tree)  # str order is bytewise order for ASCII paths
        self.early = [p for p in ordered[: len(ordered) // 10] if p != "CHANGELOG.md"]
        core = [p for p in ordered if p.startswith(("src/app/core/", "src/app/api/", "src/app/models/"))]
        hot = rng.sample(core, 12)  # Zipf-like weights by rank: CHANGELOG.md is hot, not the hottest
        self.hot = [*hot[:5], "CHANGELOG.md", *hot[5:], *rng.sample([p for p in ordered if "/core/" in p], 4)]

    def pick(self, exclude: set[str]) -> str:
        """One file to change: mostly a hot one (Zipf-like weights), else any file, untouched for long."""
        rng = self.rng
        for _ in range(1000):
            if rng.random() < 0.55:
                weights = [1 / (rank + 1) for rank in range(len(self.hot))]
                path = rng.choices(self.hot, weights)[0]
            else:
                path = rng.choice(sorted(self.tree))
            if path in self.tree and path not in exclude and not path.startswith(self.blocked):
                return path
        raise AssertionError("no file left to pick")

    def commit(self, changes: dict[str, list[str] | None], message: str) -> None:
        for path, lines in changes.items():
            if lines is None:
                (self.repo.path / path).unlink()
                del self.tree[path]
            else:
                self.tree[path] = lines
        self.repo.write({path: _joined(lines) for path, lines in changes.items() if lines is not None})
        self.repo.commit_all(message)

    def main_step(self, step: int) -> None:
        """One ordinary commit on main, of a kind drawn from the seeded distribution."""
        rng = self.rng
        roll = rng.random()
        changes: dict[str, list[str] | None] = {}
        if roll < 0.04:  # a larger commit: the same small change across 20-50 files
            picked = rng.sample([p for p in sorted(self.tree) if not p.startswith(self.blocked)], rng.randint(20, 50))
            changes = {path: edited(rng, path, self.tree[path], 1) for path in picked}
            message = f"Rename {_name(rng)} to {_name(rng)} everywhere"
        elif roll < 0.08:  # add a module and its test
            package = rng.choice([p for p in PACKAGES if not f"src/app/{p}/".startswith(self.blocked)])
            self.serial += 1
            stem = f"{_name(rng)}_new{self.serial:03d}"
            for path in (f"src/app/{package}/{stem}.py", f"tests/{package}/test_{stem}.py"):
                changes[path] = new_content(rng, path)
            message = f"{package}: add {stem}"
        elif roll < 0.10:  # delete a file nobody touches
            path = self.pick(set(self.hot))
            changes[path] = None
            message = f"Remove unused {Path(path).name}"
        elif roll < 0.12:  # rename (move) a file to another package
            path = self.pick(set(self.hot))
            if path.startswith("src/app/"):
                package = rng.choice([p for p in PACKAGES if not f"src/app/{p}/".startswith(self.blocked)])
                target = f"src/app/{package}/{Path(path).name}"
            else:
                target = str(Path(path).with_name("moved_" + Path(path).name))
            if target in self.tree:
                target = target.replace(".", "_2.", 1)
            changes[path] = None
            changes[target] = list(self.tree[path])
            message = f"Move {Path(path).name} to {Path(target).parent}"
        else:  # the usual: 1-5 files, a few hunks each
            count = rng.choices((1, 2, 3, 4, 5), (35, 25, 20, 12, 8))[0]
            picked_paths: list[str] = []
            if step % 12 == 5:  # regularly a long-untouched file early in path order
                picked_paths.append(rng.choice([p for p in self.early if p in self.tree]))
            while len(picked_paths) < count:
                picked_paths.append(self.pick(set(picked_paths)))
            changes = {path: edited(rng, path, self.tree[path], rng.randint(1, 3)) for path in picked_paths}
            message = f"{Path(picked_paths[0]).parent.name}: {rng.choice(WORDS)} {rng.choice(WORDS)} handling"
            if rng.random() < 0.3:
                message += "\n\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) + ".\n"
        self.commit(changes, message)

    def side_step(self, package: str) -> None:
        rng = self.rng
        candidates = sorted(p for p in self.tree if p.startswith((f"src/app/{package}/", f"tests/{package}/")))
        picked = rng.sample(candidates, rng.randint(1, 4))
        changes = {path: edited(rng, path, self.tree[path], rng.randint(1, 3)) for path in picked}
        self.commit(changes, f"{package}: rework {rng.choice(WORDS)}")

    def switch(self, branch: str, create: bool = False) -> None:
        if create:
            self.repo.git("checkout", "-q", "-b", branch)
            self.trees[branch] = dict(self.tree)
        else:
            self.repo.git("checkout", "-q", branch)
        self.branch = branch

    def merge(self, branch: str) -> None:
        """Merge ``branch`` into main with --no-ff (no conflicts: main left its package alone)."""
        self.repo.git("merge", "-q", "--no-ff", "-m", f"Merge branch '{branch}'", branch)
        del self.trees[branch]
        paths = [p for p in self.repo.git("ls-files", "-z").split("\0") if p]
        self.trees["main"] = {p: (self.repo.path / p).read_text().split("\n")[:-1] for p in paths}


def _joined(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def generate_repo(root: Path, files: int, history: int, seed: int) -> None:
    """A repository with ``files`` files and ``history`` first-parent commits after the initial one."""
    generator = Generator(Repo.create(root), random.Random(seed))
    generator.populate(files)
    # Two side branches: forked, worked on (interleaved with main), merged with --no-ff.
    sides = []
    for package, start, end in zip(SIDE_PACKAGES, (0.40, 0.70), (0.50, 0.82), strict=True):
        sides.append((package, int(history * start), max(int(history * start) + 3, int(history * end))))
    for step in range(1, history + 1):
        side = next(((p, s, e) for p, s, e in sides if s <= step <= e), None)
        if side and step == side[1]:
            generator.switch(f"side-{side[0]}", create=True)
            generator.side_step(side[0])
            generator.switch("main")
            generator.blocked = (f"src/app/{side[0]}/", f"tests/{side[0]}/")
        if side and step == side[2]:
            generator.merge(f"side-{side[0]}")
            generator.blocked = ()
            continue
        if side and side[1] < step and step % 3 == 0:
            generator.switch(f"side-{side[0]}")
            generator.side_step(side[0])
            generator.switch("main")
        generator.main_step(step)
    status = generator.repo.git("status", "--porcelain")
    assert not status, f"generated work tree is not clean: {status[:500]}"


# --- the measurement -------------------------------------------------------------------------------


@dataclass
class Row:
    """One layout's series over the replayed pairs."""

    name: str
    history: History | None = None
    shared: list[float] = field(default_factory=list)  # message 1, % of the new commit's bytes
    shared_both: list[float] = field(default_factory=list)  # messages 1+2
    extra: list[float] = field(default_factory=list)  # % over the per-commit message at the same commit
    tail: list[float] = field(default_factory=list)  # append: tail bytes, % of the base message
    base_moves: list[tuple[int, float]] = field(default_factory=list)  # (pair index, shared %)
    previous: tuple[bytes, bytes, str | None] | None = None  # message 1, message 2, base

    def record(self, index: int, message: bytes, diff: bytes, base: str | None) -> None:
        if self.previous is not None:
            before, before_diff, before_base = self.previous
            shared = common_prefix_length(before, message)
            both = shared
            if shared == len(before) == len(message):
                both += common_prefix_length(before_diff, diff)
            self.shared.append(100 * shared / len(message))
            self.shared_both.append(100 * both / (len(message) + len(diff)))
            if base is not None and base != before_base:
                self.base_moves.append((index, self.shared[-1]))
        self.previous = (message, diff, base)


def first_parent_commits(repo: GitRepo, count: int) -> list[str]:
    head = repo.head_commit()
    if head is None:
        raise SystemExit("the repository has no commits")
    out = repo.run("rev-list", "--first-parent", f"--max-count={count}", head, "--")
    return list(reversed(out.decode().split()))


def measure(repo: GitRepo, commits: list[str], settings: list[tuple[int, int]]) -> list[Row]:
    defaults = Settings.model_fields
    path_filter = PathFilter.build((), True)
    max_file = defaults["max_file_bytes"].default
    limits = SnapshotLimits(max_file, defaults["max_snapshot_bytes"].default, path_filter)
    diff_limits = DiffLimits(max_file, defaults["max_diff_bytes"].default, path_filter)
    per_commit, commit_first = Row("(a) per-commit"), Row("(b) commit-id-first")
    appends = [
        Row(
            ("(c') append+full" if full else "(c) append") + f" E={every} tail<={percent}%",
            History(repo, limits, HistoryLimits(every, percent, full)),
        )
        for every, percent in settings
        for full in (False, True)
    ]
    bases: dict[str, Snapshot] = {}
    for index, commit in enumerate(commits):
        diff = render_working_diff(commit, DiffParts(), diff_limits, None).message_json  # a clean checkout
        snapshot = build_snapshot(repo, commit, limits)
        per_commit.record(index, snapshot.message_json, diff, None)
        commit_first.record(index, system_message_json(f"commit: {commit}\n" + snapshot.text), diff, None)
        in_use = set()
        for row in appends:
            assert row.history is not None
            tail = row.history.tail_for(commit)
            if tail.base not in bases:
                bases[tail.base] = build_snapshot(repo, tail.base, limits, append_preamble(tail.base))
            base = bases[tail.base]
            in_use.add(tail.base)
            message = base
            if tail.commits:
                message = with_history(base, commit, list(zip(tail.commits, tail.blocks, strict=True)))
            row.record(index, message.message_json, diff, tail.base)
            if index:
                row.extra.append(100 * (message.size / snapshot.size - 1))
                row.tail.append(100 * (message.size - base.size) / base.size)
        bases = {commit: base for commit, base in bases.items() if commit in in_use}
    return [per_commit, commit_first, *appends]


def print_report(rows: list[Row], pairs: int) -> None:
    header = (
        f"{'layout':<34} | {'mean shared prefix %':>20} | {'min %':>6} | {'msg 1+2 mean %':>14} "
        f"| {'extra bytes mean/max %':>22} | {'base changes':>12}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        extra = f"{statistics.fmean(row.extra):.2f} / {max(row.extra):.2f}" if row.extra else "-"
        moves = str(len(row.base_moves)) if row.history else "-"
        print(
            f"{row.name:<34} | {statistics.fmean(row.shared):>20.2f} | {min(row.shared):>6.2f} "
            f"| {statistics.fmean(row.shared_both):>14.2f} | {extra:>22} | {moves:>12}"
        )
    print()
    for row in rows:
        if row.history is None:
            continue
        moves = ", ".join(f"#{index} ({shared:.1f}%)" for index, shared in row.base_moves) or "none"
        print(
            f"{row.name}: tail mean {statistics.fmean(row.tail):.2f}% max {max(row.tail):.2f}% of the base; "
            f"base moved at pair {moves}"
        )
    print()
    for row in rows:
        if row.history is None:
            continue
        mean_shared, mean_extra = statistics.fmean(row.shared), statistics.fmean(row.extra)
        ok = mean_shared >= GOAL_SHARED_PERCENT and mean_extra <= GOAL_EXTRA_PERCENT and pairs >= GOAL_PAIRS
        print(
            f"goal {row.name}: mean shared prefix {mean_shared:.2f}% >= {GOAL_SHARED_PERCENT:.0f}% over {pairs} "
            f"commits (>= {GOAL_PAIRS}) with mean extra bytes {mean_extra:.2f}% <= {GOAL_EXTRA_PERCENT:.0f}% "
            f"(max {max(row.extra):.2f}%): {'PASS' if ok else 'FAIL'}"
        )


def tokenizer_note() -> str:
    installed = [name for name in ("tokenizers", "transformers") if importlib.util.find_spec(name)]
    if installed:
        return f"tokens: not measured (bytes only; {', '.join(installed)} installed but no model tokenizer is loaded)"
    return "tokens: not measured (no tokenizer installed: neither tokenizers nor transformers); shares are of bytes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="replay this repository's HEAD (default: a generated one)")
    parser.add_argument("--commits", type=int, default=100, help="pairs: the last N commits vs their parent")
    parser.add_argument("--base-every", type=int, nargs="+", default=[128], metavar="E")
    parser.add_argument("--max-tail-percent", type=int, nargs="+", default=[10], metavar="P")
    parser.add_argument("--files", type=int, default=1200, help="generated repository: files")
    parser.add_argument("--history", type=int, default=150, help="generated repository: first-parent commits")
    parser.add_argument("--seed", type=int, default=7, help="generated repository: random seed")
    args = parser.parse_args()
    settings = [(every, percent) for every in args.base_every for percent in args.max_tail_percent]

    with tempfile.TemporaryDirectory(prefix="scout-bench-layouts-") as tmp:
        started = time.perf_counter()
        if args.repo is None:
            root = Path(tmp) / "repo"
            generate_repo(root, args.files, max(args.history, args.commits), args.seed)
            repo = GitRepo(str(root))
            source = f"generated repository ({args.files} files, seed {args.seed})"
        else:
            repo = GitRepo(str(args.repo))
            source = str(repo.toplevel)
        generated = time.perf_counter() - started
        commits = first_parent_commits(repo, args.commits + 1)
        if len(commits) < 2:
            raise SystemExit("need at least two first-parent commits")
        head_entries = [e for e in repo.ls_tree(commits[-1]) if e.kind == "blob"]
        print(
            f"{source}: HEAD {commits[-1][:12]} at first-parent depth {first_parent_depth(repo, commits[-1])}, "
            f"{len(head_entries)} files, {sum(e.size or 0 for e in head_entries) / 1e6:.1f} MB; "
            f"{len(commits) - 1} pairs" + (f" (generated in {generated:.1f} s)" if args.repo is None else "")
        )
        started = time.perf_counter()
        rows = measure(repo, commits, settings)
        print(f"measured in {time.perf_counter() - started:.1f} s; shares: of the new commit's message bytes")
        print(tokenizer_note())
        print()
        print_report(rows, len(commits) - 1)


if __name__ == "__main__":
    main()
