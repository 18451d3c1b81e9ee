"""A repository whose own configuration would run commands through the proxy's git calls."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

from support import Proxy, Repo, Upstream

CHAT_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def test_an_fsmonitor_hook_in_the_repositorys_config_never_runs(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """git runs core.fsmonitor on diff-index and ls-files; the proxy pins it off for every command."""
    marker = tmp_path / "fsmonitor-ran"
    hook = tmp_path / "fsmonitor-hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$@" >> {marker}\nexit 1\n')
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    repo = make_repo({"a.py": "x = 1\n"})
    repo.git("config", "core.fsmonitor", str(hook))
    repo.write({"a.py": "x = 2\n"})
    repo.git("status", "--porcelain")  # git itself runs the hook: the test's hook works
    assert marker.exists()
    marker.unlink()

    repo.write({"b.py": "y = 1\n"})
    repo.commit_all("second")  # the test's own git commands run the hook too: before the proxy starts
    marker.unlink(missing_ok=True)

    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    assert proxy.get("/health").status == 200
    assert proxy.post("/v1/chat/completions", CHAT_BODY).status == 200
    repo.write({"a.py": "x = 3\n", "c.py": "untracked\n"})  # a new working diff: diff-index and ls-files again
    for _ in range(3):
        assert proxy.post("/v1/chat/completions", CHAT_BODY).status == 200
    assert "+x = 3" in upstream.chat_requests()[-1].json()["messages"][1]["content"]
    assert not marker.exists(), marker.read_text()


CREDENTIAL_FILES = [
    ".git-credentials",
    ".pgpass",
    ".aws/credentials",
    ".aws/config",
    "deploy/.docker/config.json",
    "credentials.json",
    "gcloud/application_default_credentials.json",
    "infra/terraform.tfstate",
    "infra/terraform.tfstate.backup",
    "infra/prod.tfvars",
    ".kube/config",
    "ops/kubeconfig",
    ".htpasswd",
    ".s3cfg",
    ".envrc",
    "keys/id_rsa.old",
    ".bash_history",
    "backups/prod_dump.sql",
    "backups/db.dump",
    "keys/PRIVATE.KEY",
    "config/my.ENV",
    "certs/bundle.PEM",
]
KEPT_FILES = ["db/schema.sql", "migrations/001_init.sql", "config.json", "auth/credentials.py", "docs/ENVIRONMENT.md"]


def test_credential_files_in_any_case_never_reach_the_model(
    make_repo: Callable[..., Repo], upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    files = {path: f"secret-{index:02d}-do-not-send\n" for index, path in enumerate(CREDENTIAL_FILES)}
    files.update({path: f"kept {path}\n" for path in KEPT_FILES})
    repo = make_repo(files)
    repo.write({"new/.pgpass": "secret-untracked-do-not-send\n", "new/NOTES.TFVARS": "secret-upper-do-not-send\n"})
    proxy = start_proxy(upstream.url, {"GIT_REPO_PATH": str(repo.path)})
    assert proxy.post("/v1/chat/completions", CHAT_BODY).status == 200
    (sent,) = upstream.chat_requests()
    snapshot, diff = (m["content"] for m in sent.json()["messages"][:2])
    assert "do-not-send" not in sent.body.decode()
    for path in KEPT_FILES:
        assert f'<file path="{path}">' in snapshot, path
    excluded = snapshot[snapshot.index("files excluded by path pattern") :]
    for path in CREDENTIAL_FILES:
        assert f"  {path}\n" in excluded, path
    assert "new/.pgpass" in diff and "new/NOTES.TFVARS" in diff  # named as left out, contents not sent
