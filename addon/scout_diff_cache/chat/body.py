"""A client's request body, decoded within a size limit: a small gzip body cannot inflate to gigabytes.

mitmproxy's own decoding inflates a body in full, whatever its size. Here a body is decoded
with an output bound one byte past the limit (zlib's ``max_length``, brotli's
``output_buffer_limit``, zstd's ``max_length``): a 2 MB gzip bomb costs at most the limit in
memory. Other encodings are refused rather than decoded without a bound.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable

import brotli

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

from .errors import ApiError

DECODABLE = ("gzip", "x-gzip", "deflate", "br", "zstd", "identity")
_GZIP_OR_ZLIB = 32 + zlib.MAX_WBITS  # zlib detects either header
_RAW_DEFLATE = -zlib.MAX_WBITS


def too_large(limit: int, what: str) -> ApiError:
    return ApiError(
        413,
        f"{what} is larger than {limit} bytes (MAX_BODY_BYTES)",
        "invalid_request_error",
        "request_too_large",
    )


def decoded_body(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body without its content encodings, at most ``limit`` bytes; an ApiError (413, 415, 400) else."""
    body = raw
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    for coding in reversed(codings):  # the last coding applied is the first to undo
        if coding not in DECODABLE:
            raise ApiError(
                415,
                f"Content-Encoding {coding!r} is not accepted: send it as gzip, deflate, br, zstd or unencoded",
                "invalid_request_error",
                "unsupported_media_type",
            )
        if coding != "identity":
            body = _inflate(body, coding, limit)
    if len(body) > limit:
        raise too_large(limit, "the request body")
    return body


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of output, and whether the compressed data ended where it should."""
    try:
        inflated, complete = _DECODERS[coding](data, limit + 1)
    except (zlib.error, brotli.error, zstd.ZstdError) as e:
        raise ApiError(
            400, f"the request body is not valid {coding} data: {e}", "invalid_request_error", "invalid_request"
        ) from None
    if len(inflated) > limit:
        raise too_large(limit, f"the request body, once {coding}-decoded,")
    if not complete:
        raise ApiError(
            400, f"the request body's {coding} data is truncated", "invalid_request_error", "invalid_request"
        )
    return inflated


def _zlib(data: bytes, most: int) -> tuple[bytes, bool]:
    inflater = zlib.decompressobj(_GZIP_OR_ZLIB if _has_zlib_header(data) else _RAW_DEFLATE)
    inflated = inflater.decompress(data, most)
    return inflated, inflater.eof


def _has_zlib_header(data: bytes) -> bool:
    """gzip's magic, or a zlib header (a raw deflate stream has neither: some servers send that as 'deflate')."""
    return data[:2] == b"\x1f\x8b" or (len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0)


def _brotli(data: bytes, most: int) -> tuple[bytes, bool]:
    decoder = brotli.Decompressor()
    inflated = decoder.process(data, output_buffer_limit=most)
    return inflated, decoder.is_finished()


def _zstd(data: bytes, most: int) -> tuple[bytes, bool]:
    decoder = zstd.ZstdDecompressor()
    inflated = decoder.decompress(data, max_length=most)
    return inflated, decoder.eof


_DECODERS: dict[str, Callable[[bytes, int], tuple[bytes, bool]]] = {
    "gzip": _zlib,
    "x-gzip": _zlib,
    "deflate": _zlib,
    "br": _brotli,
    "zstd": _zstd,
}
