"""``scout-diff-cache doctor``: what stands between this machine and a cached answer, one verdict per line.

Checks, in order: git, the settings, the repository, the build cache, the listen address (policy and whether the
port is free), the upstream (reachable, its models), its context window, its tokenizer, and whether
it reports cached tokens (without which no verdict can say hit or miss). Every line starts with
``ok``, ``warn`` or ``FAIL``; the exit status is 1 when any check failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..chat.access import is_loopback
from ..chat.upstream import get_json, post_json
from ..chat.usage import usage_from_body
from ..context.buildcache import BuildCache, UnsafeCacheDir
from ..git.errors import GitError
from ..git.repo import GitRepo
from ..launch import LaunchSettings, load_launch
from ..observe.tokenizer import TokenizerEndpoint, probe_tokenizer
from ..observe.window import learn_window
from ..settings import LAUNCH_NAMES, ConfigError, Settings, changed_settings, load_settings, resolve_config_path
from ..text import human_bytes
from ..wiring import build_cache_path

TIMEOUT_SECONDS = 10
CACHE_REPORTING_HINT = (
    "vLLM: --enable-prompt-tokens-details (and prefix caching on); SGLang: --enable-cache-report; "
    "llama-server reports timings.cache_n by itself"
)


@dataclass(frozen=True)
class Verdict:
    level: str  # "ok", "warn" or "FAIL"
    check: str
    detail: str

    def line(self) -> str:
        return f"{self.level:<5} {self.check}: {self.detail}"


def git_verdict() -> Verdict:
    git = shutil.which("git")
    if git is None:
        return Verdict("FAIL", "git", "not found on PATH (the proxy reads the repository with git)")
    try:
        version = subprocess.run([git, "--version"], capture_output=True, check=True, timeout=TIMEOUT_SECONDS)
    except (OSError, subprocess.SubprocessError) as e:
        return Verdict("FAIL", "git", f"{git} does not run: {e}")
    return Verdict("ok", "git", version.stdout.decode(errors="replace").strip())


def repository_verdict(settings: Settings) -> Verdict:
    try:
        repo = GitRepo(settings.git_repo_path)
        head = repo.head_commit()
        tracked = repo.run("ls-files", "-z").count(b"\0")
    except GitError as e:
        return Verdict("FAIL", "repository", str(e))
    where = f"{repo.toplevel}"
    if head is None:
        return Verdict("warn", "repository", f"{where}: no commits yet (the snapshot is empty until the first)")
    return Verdict("ok", "repository", f"{where}: HEAD {head[:12]}, {tracked:,} tracked files")


def build_cache_verdict(settings: Settings) -> Verdict:
    path = build_cache_path(settings, os.environ)
    if path is None:
        return Verdict("warn", "build cache", "off (BUILD_CACHE_DIR=off): every start reads the whole repository")
    try:
        entries, size = BuildCache.open(path, settings.build_cache_max_bytes).usage()
    except UnsafeCacheDir as e:
        if settings.build_cache_dir == "auto":
            return Verdict("warn", "build cache", f"{e}; the proxy runs without one")
        return Verdict("FAIL", "build cache", f"{e}; the proxy refuses to start")
    limit = human_bytes(settings.build_cache_max_bytes)
    return Verdict("ok", "build cache", f"{path}: {entries} entries, {human_bytes(size)} (at most {limit})")


def listen_verdicts(launch: LaunchSettings, settings: Settings) -> list[Verdict]:
    address = f"{launch.host}:{launch.port}"
    if is_loopback(launch.host):
        policy = Verdict("ok", "listen policy", f"{address}: loopback only")
    elif settings.proxy_api_key is not None:
        policy = Verdict("ok", "listen policy", f"{address}: reachable from other machines; clients need PROXY_API_KEY")
    elif settings.allow_remote_without_key:
        policy = Verdict(
            "warn", "listen policy", f"{address}: anyone who reaches it reads the repository (no PROXY_API_KEY)"
        )
    else:
        policy = Verdict(
            "FAIL",
            "listen policy",
            f"{address} is not loopback and PROXY_API_KEY is unset: the proxy refuses to start "
            "(set PROXY_API_KEY, or HOST=127.0.0.1)",
        )
    return [policy, port_verdict(launch)]


def port_verdict(launch: LaunchSettings) -> Verdict:
    family = socket.AF_INET6 if ":" in launch.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((launch.host, launch.port))
    except OSError as e:
        return Verdict("warn", "port", f"{launch.host}:{launch.port} cannot be bound now ({e.strerror or e}): in use?")
    return Verdict("ok", "port", f"{launch.host}:{launch.port} is free")


def upstream_verdicts(launch: LaunchSettings, settings: Settings) -> list[Verdict]:
    base = launch.target_api_url
    authorization = f"Bearer {settings.target_api_key}" if settings.target_api_key else None
    try:
        models = json.loads(get_json(base + "/v1/models", authorization, TIMEOUT_SECONDS, True))
    except urllib.error.HTTPError as e:
        return [Verdict("FAIL", "upstream", f"{base}/v1/models answered {e.code} {e.reason}")]
    except (OSError, ValueError) as e:
        return [Verdict("FAIL", "upstream", f"{base} not reachable: {getattr(e, 'reason', e)}")]
    cards = models.get("data") if isinstance(models, dict) else None
    served = [str(card.get("id")) for card in cards if isinstance(card, dict)] if isinstance(cards, list) else []
    model = settings.upstream_model or (served[0] if served else settings.model_id)
    verdicts = [Verdict("ok", "upstream", f"{base} answers; serves {', '.join(served) or 'no model it names'}")]
    window = learn_window(base, settings.upstream_model, authorization, True)
    if settings.max_context_tokens is not None:
        verdicts.append(Verdict("ok", "window", f"{settings.max_context_tokens:,} tokens (MAX_CONTEXT_TOKENS)"))
    elif window.tokens is not None:
        verdicts.append(Verdict("ok", "window", f"{window.tokens:,} tokens ({window.source})"))
    else:
        assumed = f"{window.source}; the proxy assumes 131,072: set MAX_CONTEXT_TOKENS"
        verdicts.append(Verdict("warn", "window", assumed))
    probe = probe_tokenizer(TokenizerEndpoint(base, settings.upstream_model, authorization, True))
    if probe is None:
        estimated = f"no /tokenize: token counts are estimates (BYTES_PER_TOKEN {settings.bytes_per_token})"
        verdicts.append(Verdict("warn", "tokenizer", estimated))
    else:
        verdicts.append(Verdict("ok", "tokenizer", f"{probe.kind} /tokenize: exact token counts"))
    verdicts.append(cache_reporting_verdict(base, model, authorization))
    return verdicts


# About 300 tokens: several of vLLM's cache blocks, so that the second of two requests can hit.
CACHE_PROBE_TEXT = "scout-diff-cache doctor: is the prefix of this prompt cached? " * 30


def cache_reporting_verdict(base: str, model: str, authorization: str | None) -> Verdict:
    """The same prompt twice (max_tokens 1): does the second answer's usage say how many tokens were cached?

    Twice, because vLLM leaves the count out when nothing was cached.
    """
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "system", "content": CACHE_PROBE_TEXT}, {"role": "user", "content": "ping"}],
            "max_tokens": 1,
            "stream": False,
        }
    ).encode()
    try:
        for _ in range(2):
            answer = post_json(base + "/v1/chat/completions", body, authorization, TIMEOUT_SECONDS * 6, True)
    except urllib.error.HTTPError as e:
        return Verdict("FAIL", "cache reporting", f"a one-token chat request to {model!r} got {e.code} {e.reason}")
    except OSError as e:
        return Verdict("FAIL", "cache reporting", f"a one-token chat request failed: {getattr(e, 'reason', e)}")
    usage = usage_from_body(answer)
    if usage is not None and usage.reports_cache:
        cached = f"{usage.cached_tokens} of {usage.prompt_tokens}" if usage.prompt_tokens else str(usage.cached_tokens)
        return Verdict("ok", "cache reporting", f"the same prompt again: {cached} prompt tokens cached, reported")
    return Verdict(
        "warn",
        "cache reporting",
        f"answers do not say how many prompt tokens were cached, so verdicts say 'unknown' ({CACHE_REPORTING_HINT})",
    )


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="scout-diff-cache doctor",
        description="Check git, the repository, the settings, the listen address and the upstream (reachable, "
        "window, tokenizer, cache reporting); exit status 1 if any check fails.",
    )
    result.add_argument("--config", metavar="PATH", help="config file, as for the proxy")
    for name in LAUNCH_NAMES:
        result.add_argument("--" + name.replace("_", "-"), metavar=name.upper())
    result.add_argument("--repo", help="git work tree (default: GIT_REPO_PATH, else the current directory)")
    return result


def run(argv: Sequence[str], emit: Callable[[str], None] = print) -> int:
    args = parser().parse_args(argv)
    verdicts = [git_verdict()]
    config_path = resolve_config_path(args.config, os.environ)
    try:
        launch, _ = load_launch({name: getattr(args, name) for name in LAUNCH_NAMES}, os.environ, config_path)
        settings, sources = load_settings({"git_repo_path": args.repo}, os.environ, config_path)
    except ConfigError as e:
        verdicts.append(Verdict("FAIL", "settings", str(e)))
        return _report(verdicts, emit)
    verdicts.append(
        Verdict("ok", "settings", f"config file {config_path or 'none'}; {changed_settings(settings, sources)}")
    )
    verdicts.append(repository_verdict(settings))
    verdicts.append(build_cache_verdict(settings))
    verdicts.extend(listen_verdicts(launch, settings))
    verdicts.extend(upstream_verdicts(launch, settings))
    return _report(verdicts, emit)


def _report(verdicts: Sequence[Verdict], emit: Callable[[str], None]) -> int:
    for verdict in verdicts:
        emit(verdict.line())
    failed = [v.check for v in verdicts if v.level == "FAIL"]
    emit(f"{len(failed)} failed: {', '.join(failed)}" if failed else "all checks passed (warnings above, if any)")
    return 1 if failed else 0
