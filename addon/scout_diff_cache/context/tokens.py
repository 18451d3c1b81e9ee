"""Token measures: how message 1's plan and a request's fit count tokens.

A measure counts a batch of texts (blocking: an exact one asks the model server). The kinds:

- exact: the upstream's own tokenizer (``observe/tokenizer.py``), cached per text;
- ``BYTE_BOUND``: one token per UTF-8 byte. Never below the truth for the byte-level vocabularies
  Llama models use (Llama 3/4's BPE, llama.cpp's byte-fallback vocabularies): every token covers at
  least one byte. Free to compute, so a request that fits by it needs no counting at all;
- ``BytesPerTokenRule``: bytes divided by ``bytes_per_token``, rounded up; an estimate for servers
  that offer no tokenizer, conservative for Llama 4 on code (about 4 bytes per token) at the default 3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class TokenMeasure(Protocol):
    @property
    def name(self) -> str:
        """Says what counts (shown in /health and the preview)."""
        ...

    @property
    def identity(self) -> str:
        """Tells this measure's counts from any other's (part of a plan's cache key, also on disk)."""
        ...

    @property
    def exact(self) -> bool: ...

    def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text on its own, without special tokens (blocking)."""
        ...


def utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class ByteBound:
    name: str = "byte bound (1 token per byte)"
    exact: bool = False

    @property
    def identity(self) -> str:
        return self.name

    def count(self, texts: Sequence[str]) -> list[int]:
        return [utf8_length(text) for text in texts]


BYTE_BOUND = ByteBound()


@dataclass(frozen=True)
class BytesPerTokenRule:
    bytes_per_token: float

    @property
    def name(self) -> str:
        return f"estimate ({self.bytes_per_token:g} bytes per token; the upstream offers no tokenizer)"

    @property
    def identity(self) -> str:
        return self.name

    @property
    def exact(self) -> bool:
        return False

    def count(self, texts: Sequence[str]) -> list[int]:
        return [math.ceil(utf8_length(text) / self.bytes_per_token) for text in texts]
