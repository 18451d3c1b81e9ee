"""Message 1's closing ``<snapshot_info>``, and cutting the snapshot's files to fit the window.

The footer names the commit and everything left out, with the reason; when the files were cut
to fit the window (``fit.py``), what was outlined and omitted, grouped (``listings.py``) so the
listings fit their share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .fit import LISTING_PERCENT, TEMPLATE_TOKENS, FitReport, Omitted, Outlined, WindowBudget, choose, fits_whole
from .listings import Listed, fitting_text, render_listing
from .secrets import redaction_listing
from .tokens import BYTE_BOUND, utf8_length

if TYPE_CHECKING:  # snapshot.py imports this module
    from .snapshot import LeftOut, SnapshotContent, SnapshotLimits


def _listed(items: Sequence[LeftOut], describe: str) -> list[Listed]:
    result = []
    for item in items:
        extra = ""
        if describe == "size" and item.size is not None:
            extra = f" ({item.size} bytes)"
        elif describe == "detail" and item.detail:
            extra = f" @ {item.detail}"
        result.append(Listed(item.path, extra, item.size or 0))
    return result


def _fit_lines(report: FitReport, level: str) -> list[str]:
    if not report.cut:
        return []
    return [
        f"context window: the files are {report.repository_tokens} tokens; message 1 has {report.budget} "
        f"(its share of the model's window), so it holds the most important files in full, outlines of "
        f"others and the names of the rest (counted by: {report.measure})\n",
        render_listing(
            "files outlined to fit the context window (signatures only)",
            [
                Listed(o.path, f" ({o.full_tokens} tokens in full, outline {o.tokens})", o.full_tokens)
                for o in report.outlined
            ],
            level,
            "tokens in full",
        ),
        render_listing(
            "files omitted to fit the context window",
            [Listed(o.path, f" ({o.tokens} tokens)", o.tokens) for o in report.omitted],
            level,
            "tokens",
        ),
    ]


def render_footer(
    commit: str | None, content: SnapshotContent, limits: SnapshotLimits, fit_level: str = "file", level: str = "file"
) -> str:
    """The closing ``<snapshot_info>``; its listings at these levels of detail (listings.LEVELS)."""
    parts = [
        "<snapshot_info>\n",
        f"commit: {commit}\n" if commit else "commit: none (the repository has no commits yet)\n",
        f"files included: {content.file_count}, symbolic links: {content.symlink_count}, "
        + f"bytes: {content.block_bytes}\n",
        *(_fit_lines(content.fit, fit_level) if content.fit else []),
        render_listing("binary files, not included", _listed(content.binary, "size"), level, "bytes"),
        render_listing(
            f"files over the per-file limit of {limits.max_file_bytes} bytes, not included",
            _listed(content.too_large, "size"),
            level,
            "bytes",
        ),
        render_listing("files excluded by path pattern", _listed(content.excluded, ""), level),
        render_listing(
            f"files omitted because the snapshot reached its limit of {limits.max_snapshot_bytes} bytes "
            "(every file from this one on, in path order)",
            _listed(content.over_total, "size"),
            level,
            "bytes",
        ),
        render_listing("submodules, listed but not entered", _listed(content.submodules, "detail"), level),
        redaction_listing(content.redactions_shown()),
        "</snapshot_info>\n",
    ]
    return "".join(parts)


def fit_to_window(
    commit: str | None, content: SnapshotContent, limits: SnapshotLimits, preamble: str, budget: WindowBudget
) -> str:
    """Cut ``content`` to ``budget`` if it does not fit (fit.py); the footer that goes with it."""
    footer = render_footer(commit, content, limits)
    whole, counts = fits_whole(content.blocks, [preamble, footer], budget)
    if whole:
        measured = counts if counts is not None else BYTE_BOUND.count(content.blocks)
        fixed = budget.measure.count([preamble, footer]) if counts is not None else BYTE_BOUND.count([preamble, footer])
        content.fit = FitReport(
            budget.tokens, budget.measure.name if counts is not None else BYTE_BOUND.name, sum(measured)
        )
        content.fit.planned_tokens = sum(measured) + sum(fixed) + TEMPLATE_TOKENS
        return footer
    assert counts is not None
    fixed_tokens = budget.measure.count([preamble])[0] + TEMPLATE_TOKENS
    # The listings' share, and at least what they take at their shortest (counts only) plus the sentence
    # the cut adds: on a small window those are most of it.
    content.fit = FitReport(budget.tokens, budget.measure.name, sum(counts), cut=True)
    if content.block_paths:  # both lists present: their titles count too
        content.fit.outlined = [Outlined(content.block_paths[0], 0, 0)]
        content.fit.omitted = [Omitted(path, count) for path, count in zip(content.block_paths, counts, strict=True)]
    shortest = budget.measure.count([render_footer(commit, content, limits, "count", "count")])[0]
    reserve = budget.tokens * LISTING_PERCENT // 100 + shortest
    choice = choose(
        content.blocks, content.block_paths, counts, budget, fixed_tokens=fixed_tokens, listing_reserve=reserve
    )
    outlined = {item.path for item in choice.report.outlined}
    content.blocks, content.block_paths = choice.blocks, choice.paths
    content.block_bytes = sum(utf8_length(block) for block in content.blocks)
    content.symlink_count = sum(block.startswith("<symlink ") for block in content.blocks)
    content.file_count = len(content.blocks) - content.symlink_count - len(outlined)
    content.outline_count = len(outlined)
    content.fit = choice.report
    footer = fitting_text(
        lambda *levels: render_footer(commit, content, limits, *levels),
        lambda text: budget.measure.count([text])[0],
        reserve,
    )
    content.fit.planned_tokens += budget.measure.count([footer])[0]
    return footer
