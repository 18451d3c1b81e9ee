"""Patch text as git writes it: C-style path quoting, blob ids, new-file patches, splitting per file."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from ..text import decode_utf8, is_binary

_C_ESCAPES = {
    7: "a",
    8: "b",
    9: "t",
    10: "n",
    11: "v",
    12: "f",
    13: "r",
    34: '"',
    92: "\\",
}
_C_UNESCAPES = {v: k for k, v in _C_ESCAPES.items()}


def git_quote(name: bytes) -> str:
    """git's quote_c_style with core.quotePath=false: quoted only if it holds '"', '\\' or controls."""
    if not any(b < 0x20 or b == 0x7F or b in (34, 92) for b in name):
        return decode_utf8(name)
    out = bytearray(b'"')
    for b in name:
        if b in _C_ESCAPES:
            out += b"\\" + _C_ESCAPES[b].encode()
        elif b < 0x20 or b == 0x7F:
            out += b"\\%03o" % b
        else:
            out.append(b)
    out += b'"'
    return decode_utf8(bytes(out))


def git_unquote(text: bytes) -> bytes:
    """Inverse of git_quote for one quoted name (without the surrounding quotes)."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == 92 and i + 1 < len(text):
            nxt = chr(text[i + 1])
            if nxt in _C_UNESCAPES:
                out.append(_C_UNESCAPES[nxt])
                i += 2
                continue
            out.append(int(text[i + 1 : i + 4], 8))
            i += 4
            continue
        out.append(text[i])
        i += 1
    return bytes(out)


def blob_id(data: bytes, object_format: str) -> str:
    """The object id git gives a blob with this content."""
    return hashlib.new(object_format, b"blob %d\0" % len(data) + data).hexdigest()


def new_file_patch(path: bytes, data: bytes, mode: str, object_format: str) -> str:
    """A new-file patch for an untracked file, as ``git diff --no-index --full-index`` writes it."""
    name_a, name_b = git_quote(b"a/" + path), git_quote(b"b/" + path)
    zeros = "0" * (64 if object_format == "sha256" else 40)
    head = f"diff --git {name_a} {name_b}\nnew file mode {mode}\nindex {zeros}..{blob_id(data, object_format)}\n"
    if not data:
        return head
    if is_binary(data):
        return head + f"Binary files /dev/null and {name_b} differ\n"
    tab = "\t" if b" " in path else ""
    text = decode_utf8(data)
    lines = text.split("\n")
    missing_newline = lines[-1] != ""
    if not missing_newline:
        lines.pop()
    count = "" if len(lines) == 1 else f",{len(lines)}"
    body = "".join(f"+{line}\n" for line in lines)
    tail = "\\ No newline at end of file\n" if missing_newline else ""
    return f"{head}--- /dev/null\n+++ {name_b}{tab}\n@@ -0,0 +1{count} @@\n{body}{tail}"


def patch_path(header_line: bytes) -> bytes:
    """The path of a ``diff --git a/P b/P`` header.

    Renames are off, so both names are the same path and, quoted or not, the same length: the
    first name is the first half. (Looking for the closing quote instead is wrong for names that
    hold an escaped quote followed by a space.)
    """
    names = header_line.removeprefix(b"diff --git ")
    first = names[: (len(names) - 1) // 2]
    if first.startswith(b'"') and first.endswith(b'"') and len(first) > 1:
        first = git_unquote(first[1:-1])
    return first.removeprefix(b"a/")


def split_patch(patch: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Split multi-file patch output into (path, per-file patch); a file's patch starts at 'diff --git '."""
    if not patch:
        return
    starts = [0] if patch.startswith(b"diff --git ") else []
    position = patch.find(b"\ndiff --git ")
    while position >= 0:
        starts.append(position + 1)
        position = patch.find(b"\ndiff --git ", position + 1)
    for begin, end in zip(starts, [*starts[1:], len(patch)], strict=True):
        chunk = patch[begin:end]
        yield (
            patch_path(chunk[: chunk.index(b"\n")] if b"\n" in chunk else chunk),
            chunk,
        )
