from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from inprocess import ScoutAddons
from support import CLEARED_ENV_NAMES, Proxy, Repo, Upstream, run_proxy, run_upstream

_GIT_HOME = tempfile.mkdtemp(prefix="scout-test-git-")


def pytest_configure(config: pytest.Config) -> None:
    # Hermetic git: no user or system config leaks into the repos the tests make or read.
    global_config = Path(_GIT_HOME) / "gitconfig"
    global_config.write_text('[init]\n\tdefaultBranch = main\n[protocol "file"]\n\tallow = always\n')
    os.environ["GIT_CONFIG_GLOBAL"] = str(global_config)
    os.environ["GIT_CONFIG_NOSYSTEM"] = "1"


@pytest.fixture(autouse=True)
def own_build_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Addons loaded in this process read BUILD_CACHE_DIR from the environment: a cache per test, so
    no test is served another's entries (proxies started by a test get their own, see proxy_env)."""
    monkeypatch.setenv("BUILD_CACHE_DIR", str(tmp_path_factory.mktemp("build-cache")))


@pytest.fixture
def make_repo(tmp_path: Path) -> Callable[..., Repo]:
    counter = iter(range(1000))

    def factory(files: Mapping[str, str | bytes] | None = None, commit: bool = True, name: str | None = None) -> Repo:
        return Repo.create(tmp_path / (name or f"repo{next(counter)}"), files, commit)

    return factory


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with run_upstream() as server:
        yield server


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Start mitmdump processes for the test; every one of them is stopped when the test ends."""
    with contextlib.ExitStack() as stack:
        counter = iter(range(1000))

        def factory(
            upstream_url: str,
            env: Mapping[str, str],
            extra_args: tuple[str, ...] = (),
            wait: bool = True,
            **launch: Any,
        ) -> Proxy:
            work_dir = tmp_path / f"proxy{next(counter)}"
            return stack.enter_context(run_proxy(upstream_url, work_dir, env, extra_args, wait, **launch))

        yield factory


@pytest.fixture
def clean_scout_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No scout setting inherited from the environment; an empty config file. Returns its path."""
    for name in CLEARED_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "empty-config.yaml"
    config.write_text("{}\n")
    monkeypatch.setenv("SCOUT_CONFIG", str(config))
    return config


@pytest.fixture
def addon(clean_scout_env: Path) -> Iterator[ScoutAddons]:
    """The addon list, for in-process tests with mitmproxy.test.taddons; its watcher is stopped after."""
    instance = ScoutAddons()
    yield instance
    instance.stop()
