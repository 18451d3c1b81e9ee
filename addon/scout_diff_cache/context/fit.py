"""Fitting message 1 into its share of the model's context window (README "Fitting the context window").

A pure function of the files, the budget and the token measure: every replica and every restart
that sees the same commit, settings, window and tokenizer makes the same choice, so message 1
keeps its bytes. Steps:

1. Everything fits (by the byte bound, else by the measure): nothing changes.
2. Else ``LISTING_PERCENT`` of the budget is kept for the closing listings and ``OUTLINE_PERCENT``
   for outlines. Files are taken in full in priority order (``tiers.py``) while they fit; a file
   that does not fit is passed over and smaller ones after it are still tried.
3. The files not taken get an outline (``outline.py``), in the same order, while outlines fit in
   what is left (made ``OUTLINE_BATCH`` at a time; a batch of which none fits ends it); then
   files not taken yet go in full if they fit in what remains; the rest are listed by path with
   their token counts.

Rendering stays in bytewise path order: selection only decides what is in and in which form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..git.exclusions import PathFilter
from .outline import clear_outlines, language_of, outline_block, outline_text
from .tiers import TIER_NAMES, clear_reference_scans, priorities, reference_counts, tier_of
from .tokens import BYTE_BOUND, TokenMeasure

LISTING_PERCENT = 5
OUTLINE_PERCENT = 20
BLOCK_SLACK_TOKENS = 1  # counted apart, a block's edges can tokenize one token differently than joined
TEMPLATE_TOKENS = 64  # the chat template's tokens around a system message, with room to spare
OUTLINE_BATCH = 64  # outlines are made and counted this many at a time, in priority order


def clear_caches() -> None:
    """Forget every cached outline and reference scan (the benchmark's cold runs)."""
    clear_outlines()
    clear_reference_scans()


@dataclass(frozen=True)
class WindowBudget:
    """Message 1's share of the window and how to count it; a snapshot's cache key includes ``key``."""

    tokens: int
    measure: TokenMeasure
    include_first: PathFilter | None = None

    @property
    def key(self) -> tuple[int, str, tuple[str, ...]]:
        return (self.tokens, self.measure.identity, self.include_first.patterns if self.include_first else ())


@dataclass(frozen=True)
class Outlined:
    path: bytes
    tokens: int
    full_tokens: int


@dataclass(frozen=True)
class Omitted:
    path: bytes
    tokens: int


@dataclass
class FitReport:
    """How message 1 was fitted: shown at its end, in /health, the preview, the log and mitmweb."""

    budget: int
    measure: str
    repository_tokens: int  # every candidate file in full
    planned_tokens: int = 0  # message 1 as planned (an upper estimate with the byte bound)
    cut: bool = False
    outlined: list[Outlined] = field(default_factory=list)
    omitted: list[Omitted] = field(default_factory=list)
    # tier name -> [tokens in full, tokens outlined, tokens omitted (in full)]
    tiers: dict[str, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "budget_tokens": self.budget,
            "counted_by": self.measure,
            "repository_tokens": self.repository_tokens,
            "planned_tokens": self.planned_tokens,
            "cut_to_fit": self.cut,
            "outlined_files": len(self.outlined),
            "omitted_files": len(self.omitted),
        }


@dataclass(frozen=True)
class FitChoice:
    """What goes into message 1: the chosen blocks (full or outline) in path order, and the report."""

    blocks: list[str]
    paths: list[bytes]
    report: FitReport


def block_text_content(block: str) -> bytes:
    """A file block's file content (for outlining): between its opening line and ``</file>``."""
    start = block.find("\n") + 1
    return block[start : len(block) - len("</file>\n")].encode("utf-8")


def fits_whole(blocks: Sequence[str], fixed: Sequence[str], budget: WindowBudget) -> tuple[bool, list[int] | None]:
    """Whether everything fits; the measured counts, if it took counting to know."""
    slack = TEMPLATE_TOKENS + BLOCK_SLACK_TOKENS * (len(blocks) + len(fixed))
    if sum(BYTE_BOUND.count([*blocks, *fixed])) + slack <= budget.tokens:
        return True, None
    counts = budget.measure.count(blocks)
    return sum(counts) + sum(budget.measure.count(fixed)) + slack <= budget.tokens, counts


def choose(
    blocks: Sequence[str],
    paths: Sequence[bytes],
    counts: Sequence[int],
    budget: WindowBudget,
    *,
    fixed_tokens: int,
    listing_reserve: int,
) -> FitChoice:
    """Step 2 and 3 of the module docstring, for files that do not all fit.

    ``fixed_tokens``: the preamble and the template; ``listing_reserve``: kept for the closing listings.
    """
    report = FitReport(budget.tokens, budget.measure.name, sum(counts), cut=True)
    index_of = {path: index for index, path in enumerate(paths)}
    references = reference_counts({path: block for path, block in zip(paths, blocks, strict=True)})
    order = priorities(paths, references, budget.include_first)
    full_budget = budget.tokens - fixed_tokens - listing_reserve - budget.tokens * OUTLINE_PERCENT // 100
    chosen: dict[bytes, str] = {}
    used = 0
    for path in order:
        cost = counts[index_of[path]] + BLOCK_SLACK_TOKENS
        if used + cost <= full_budget:
            chosen[path] = blocks[index_of[path]]
            used += cost
    left = budget.tokens - fixed_tokens - listing_reserve - used
    outlinable = [path for path in order if path not in chosen and language_of(path) is not None]
    for start in range(0, len(outlinable), OUTLINE_BATCH):
        if left <= BLOCK_SLACK_TOKENS:
            break
        before = left
        batch = []
        for path in outlinable[start : start + OUTLINE_BATCH]:
            index = index_of[path]
            outline = outline_text(path, block_text_content(blocks[index]))
            if outline is not None:
                batch.append((path, outline_block(path, outline, counts[index])))
        for (path, block), tokens in zip(batch, budget.measure.count([b for _, b in batch]), strict=True):
            if tokens + BLOCK_SLACK_TOKENS <= left:
                chosen[path] = block
                left -= tokens + BLOCK_SLACK_TOKENS
                used += tokens + BLOCK_SLACK_TOKENS
                report.outlined.append(Outlined(path, tokens, counts[index_of[path]]))
        if left == before:
            break  # a whole batch too large for what is left: stop parsing (the rest is listed)
    for path in order:  # what the outlines left: small files passed over, in full after all
        cost = counts[index_of[path]] + BLOCK_SLACK_TOKENS
        if path not in chosen and cost <= left:
            chosen[path] = blocks[index_of[path]]
            left -= cost
            used += cost
    report.outlined.sort(key=lambda item: item.path)
    report.omitted = [Omitted(path, counts[index_of[path]]) for path in sorted(paths) if path not in chosen]
    outlined = {item.path for item in report.outlined}
    for path in paths:
        name = TIER_NAMES[tier_of(path, budget.include_first)]
        row = report.tiers.setdefault(name, [0, 0, 0])
        row[0 if path in chosen and path not in outlined else 1 if path in outlined else 2] += counts[index_of[path]]
    report.planned_tokens = fixed_tokens + used
    kept = sorted(chosen)
    return FitChoice([chosen[path] for path in kept], kept, report)
