"""The secret scanner on its own: recall on planted secrets, no false positives on bait (issue 15)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from scout_diff_cache.context import secrets
from scout_diff_cache.context.changes import changes_between
from scout_diff_cache.context.retrieval import Found, fit_retrieved
from scout_diff_cache.context.secrets import SecretPatternError, SecretScanner, file_lines, redaction_listing
from scout_diff_cache.context.tokens import BytesPerTokenRule
from scout_diff_cache.context.workdiff import DiffLimits, build_working_diff
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from scout_diff_cache.settings import Settings
from scout_diff_cache.wiring import secret_scanner
from secret_corpus import BAIT, PLANTED, planted_files
from support import Repo


def test_every_planted_secret_is_replaced_by_a_placeholder_naming_its_kind() -> None:
    scanner = SecretScanner()
    files = planted_files()
    for planted in PLANTED:
        redacted, found = scanner.redact(planted.path.encode(), files[planted.path].encode())
        assert planted.secret.encode() not in redacted, planted.kind
        assert f"[redacted {planted.kind}]".encode() in redacted, (planted.kind, redacted)
        assert planted.kind in {redaction.kind for redaction in found}
    kinds = {planted.kind for planted in PLANTED}
    assert len(kinds) >= 22 and len(PLANTED) >= 24  # the formats the issue lists, each in a real file


def test_bait_is_left_byte_for_byte() -> None:
    scanner = SecretScanner()
    for path, text in BAIT.items():
        redacted, found = scanner.redact(path.encode(), text.encode())
        assert (redacted, found) == (text.encode(), ()), path


def test_the_same_input_gives_the_same_bytes_in_every_scanner() -> None:
    files = planted_files()
    first = [SecretScanner().redact(path.encode(), text.encode()) for path, text in files.items()]
    again = [SecretScanner().redact(path.encode(), text.encode()) for path, text in files.items()]
    assert first == again


def test_a_private_key_keeps_its_line_count_and_a_patch_its_prefixes() -> None:
    scanner = SecretScanner()
    key = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nAAAABG5vbmUAAAAEbm9uZQ\n"
        "-----END OPENSSH PRIVATE KEY-----"
    )
    text = f"before\n{key}\nafter\n".encode()
    redacted, found = scanner.redact(b"id_ed25519.txt", text)
    assert redacted == b"before\n[redacted private-key]\n\n\n\nafter\n"
    assert [(r.line, r.kind) for r in found] == [(2, "private-key")]
    patch = "@@ -1,0 +1,6 @@\n+before\n" + "".join(f"+{line}\n" for line in key.split("\n")) + "+after\n"
    redacted, _ = scanner.redact_patch(b"x.txt", patch.encode())
    assert redacted == b"@@ -1,0 +1,6 @@\n+before\n+[redacted private-key]\n+\n+\n+\n+after\n"


def test_a_secret_removed_by_a_patch_is_redacted_and_found_at_its_old_line() -> None:
    token = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    patch = (
        "diff --git a/app.py b/app.py\n--- a/app.py\n+++ b/app.py\n@@ -10,3 +10,2 @@\n"
        f" x = 1\n-TOKEN = '{token}'\n+TOKEN = os.environ['TOKEN']\n"
    ).encode()
    redacted, found = SecretScanner().redact_patch(b"app.py", patch)
    assert token.encode() not in redacted and b"-TOKEN = '[redacted github-token]'" in redacted
    assert [(r.line, r.kind) for r in found] == [(11, "github-token")]
    assert file_lines(patch) == {5: 10, 6: 11, 7: 11}


def test_allow_lists_and_extra_patterns() -> None:
    token = "ghp_" + "Z" * 36
    text = f"T = '{token}'\nINTERNAL = 'corp_key_0123456789abcdef0123456789abcdef'\n".encode()
    allowed = SecretScanner(allow_values=[token], extra_patterns=[r"corp_key_([0-9a-f]{32})"])
    redacted, found = allowed.redact(b"a.py", text)
    assert token.encode() in redacted and b"corp_key_[redacted custom-1]" in redacted
    assert [r.kind for r in found] == ["custom-1"]
    by_path = SecretScanner(allow_paths=["tests/fixtures/"])
    assert by_path.redact(b"tests/fixtures/key.txt", text) == (text, ())
    assert by_path.redact(b"src/key.txt", text)[1]
    with pytest.raises(SecretPatternError, match="groups"):
        SecretScanner(extra_patterns=[r"(a)(b)"])
    with pytest.raises(SecretPatternError, match="not a valid RE2 pattern"):
        SecretScanner(extra_patterns=[r"(unclosed"])


def test_settings_make_the_scanner_and_patterns_keep_their_commas() -> None:
    settings = Settings.model_validate({"secret_patterns": "key_[0-9]{8,12}\nother_(x{2,3})"})
    assert settings.secret_patterns == ("key_[0-9]{8,12}", "other_(x{2,3})")
    assert secret_scanner(Settings.model_validate({"redact_secrets": "false"})) is None
    scanner = secret_scanner(settings)
    assert scanner is not None and scanner.redact(b"a", b"key_123456789")[0] == b"[redacted custom-1]"


def test_the_listing_names_path_line_and_kind_never_the_value() -> None:
    files = planted_files()
    scanner = SecretScanner()
    found = [r for path, text in files.items() for r in scanner.redact(path.encode(), text.encode())[1]]
    listing = redaction_listing(found)
    assert listing.startswith(f'<redacted_secrets count="{len(found)}">')
    assert "src/cloud.py:3 aws-access-key-id" in listing
    assert not any(planted.secret in listing for planted in PLANTED)


def test_change_messages_and_retrieved_files_are_redacted_too(make_repo: Callable[..., Repo]) -> None:
    """A continuing conversation's change message and a retrieval message never carry a secret either."""
    repo = make_repo({"app.py": "x = 1\n"})
    git = GitRepo(str(repo.path))
    limits = DiffLimits(100_000, 1_000_000, PathFilter.build([], True), SecretScanner())
    before = build_working_diff(git, repo.head(), limits).state
    token = "ghp_" + "Q9w8E7r6T5y4U3i2O1p0A9s8D7f6G5h4J3k2"
    repo.write({"app.py": f"x = 1\nTOKEN = '{token}'\n"})
    changes = changes_between(git, before, build_working_diff(git, repo.head(), limits).state, limits)
    assert changes is not None and token not in changes.text
    assert "+TOKEN = '[redacted github-token]'" in changes.text and "app.py:2 github-token" in changes.text
    found = Found(b"app.py", "oid", f"TOKEN = '{token}'\n".encode(), "score 1.0")
    retrieved = fit_retrieved([found], 10_000, BytesPerTokenRule(3.0), "c" * 40, SecretScanner())
    assert retrieved is not None
    text = json.loads(retrieved.message_json)["content"]
    assert token not in text and "[redacted github-token]" in text and "app.py:1 github-token" in text


def test_without_hyperscan_re2_alone_finds_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hyperscan is only a prefilter (x86-64 only): without it every file goes to RE2, same bytes out."""
    files = {**planted_files(), **BAIT}
    with_prefilter = SecretScanner()
    monkeypatch.setattr(secrets, "hyperscan", None)
    without = SecretScanner()
    for path, text in files.items():
        assert without.redact(path.encode(), text.encode()) == with_prefilter.redact(path.encode(), text.encode())
