# ruff: noqa: E501  (a corpus: each secret on one line, as it is written in a repository)
"""Planted secrets in their real formats (all fake, generated) and bait that must stay intact.

Used by ``test_secrets.py`` (recall and false positives of the scanner), the proxy test (nothing
of it reaches the upstream) and ``bench/bench_secrets.py``.
"""

from __future__ import annotations

import base64
import random
import string
from dataclasses import dataclass

_rng = random.Random(15)


def _chars(alphabet: str, n: int) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits
B64 = ALNUM + "+/"


@dataclass(frozen=True)
class Planted:
    kind: str
    path: str
    text: str  # the file's content
    secret: str  # what must not reach the model


def _pem(label: str) -> str:
    body = "\n".join(_chars(B64, 64) for _ in range(8))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----"


_PEM = _pem("RSA PRIVATE KEY")
_SA_KEY = _pem("PRIVATE KEY")
_KUBE_KEY = base64.b64encode(_pem("EC PRIVATE KEY").encode()).decode()
_JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkphbmUifQ." + _chars(ALNUM, 43)

PLANTED = [
    Planted("aws-access-key-id", "src/cloud.py", "", "AKIA" + _chars(string.ascii_uppercase + string.digits, 16)),
    Planted("aws-secret-access-key", "src/cloud.py", "", _chars(B64, 40)),
    Planted("github-token", "ci/release.sh", "", "ghp_" + _chars(ALNUM, 36)),
    Planted("github-fine-grained-token", "ci/mirror.sh", "", f"github_pat_{_chars(ALNUM, 22)}_{_chars(ALNUM, 59)}"),
    Planted("gitlab-token", "ci/gitlab.yml", "", "glpat-" + _chars(ALNUM, 20)),
    Planted("slack-token", "src/notify.py", "", f"xoxb-{_chars(string.digits, 12)}-{_chars(string.digits, 13)}-{_chars(ALNUM, 24)}"),
    Planted("slack-webhook", "src/notify.py", "", f"https://hooks.slack.com/services/T{_chars('ABCDEFGHJ0123456789', 8)}/B{_chars('ABCDEFGHJ0123456789', 10)}/{_chars(ALNUM, 24)}"),
    Planted("stripe-key", "src/billing.py", "", "sk_live_" + _chars(ALNUM, 24)),
    Planted("openai-key", "src/llm.py", "", "sk-proj-" + _chars(ALNUM + "_-", 64)),
    Planted("anthropic-key", "src/llm.py", "", "sk-ant-api03-" + _chars(ALNUM + "_-", 93) + "AA"),
    Planted("google-api-key", "web/maps.js", "", "AIza" + _chars(ALNUM + "_-", 35)),
    Planted("npm-token", "web/.npmrc.example.txt", "", "npm_" + _chars(ALNUM, 36)),
    Planted("pypi-token", "release/pypirc.txt", "", "pypi-AgEIcHlwaS5vcmc" + _chars(ALNUM + "_-", 70)),
    Planted("sendgrid-key", "src/mail.py", "", f"SG.{_chars(ALNUM, 22)}.{_chars(ALNUM, 43)}"),
    Planted("huggingface-token", "ml/download.py", "", "hf_" + _chars(string.ascii_letters, 34)),
    Planted("jwt", "tests/fixtures/session.txt", "", _JWT),
    Planted("url-password", "config/database.yml", "", "S3cr3t" + _chars(ALNUM, 10)),
    Planted("azure-storage-key", "config/azure.txt", "", _chars(B64, 86) + "=="),
    Planted("private-key", "notes/server-key.txt", "", _PEM),
    Planted("private-key-base64", "deploy/kubeconfig.yaml", "", _KUBE_KEY),
    Planted("private-key", "deploy/service-account.json", "", _SA_KEY.replace("\n", "\\n")),
    Planted("gcp-private-key-id", "deploy/service-account.json", "", _chars("0123456789abcdef", 40)),
    Planted("secret-assignment", "src/settings.py", "", "Xk9#mQ2$vL7pR4wZ"),
    Planted("secret-assignment", "deploy/app.conf", "", _chars(ALNUM, 24)),
]  # fmt: skip
_by = {(p.kind, p.path): p for p in PLANTED}


def _secret(kind: str, path: str) -> str:
    return _by[(kind, path)].secret


def planted_files() -> dict[str, str]:
    """The repository's files, each secret in the way it is usually written."""
    return {
        "src/cloud.py": (
            "import boto3\n\n"
            f'AWS_ACCESS_KEY_ID = "{_secret("aws-access-key-id", "src/cloud.py")}"\n'
            f'aws_secret_access_key = "{_secret("aws-secret-access-key", "src/cloud.py")}"\n'
            "client = boto3.client('s3', aws_access_key_id=AWS_ACCESS_KEY_ID)\n"
        ),
        "ci/release.sh": f"#!/bin/sh\ncurl -H 'Authorization: token {_secret('github-token', 'ci/release.sh')}' https://api.github.com\n",
        "ci/mirror.sh": f"git push https://x-access-token:{_secret('github-fine-grained-token', 'ci/mirror.sh')}@github.com/o/r\n",
        "ci/gitlab.yml": f"variables:\n  PUSH_TOKEN: {_secret('gitlab-token', 'ci/gitlab.yml')}\n",
        "src/notify.py": (
            f'SLACK_BOT = "{_secret("slack-token", "src/notify.py")}"\n'
            f'WEBHOOK = "{_secret("slack-webhook", "src/notify.py")}"\n'
        ),
        "src/billing.py": f"import stripe\nstripe.api_key = '{_secret('stripe-key', 'src/billing.py')}'\n",
        "src/llm.py": (
            f'client = OpenAI(api_key="{_secret("openai-key", "src/llm.py")}")\n'
            f'claude = Anthropic(api_key="{_secret("anthropic-key", "src/llm.py")}")\n'
        ),
        "web/maps.js": f"const MAPS = '{_secret('google-api-key', 'web/maps.js')}';\n",
        "web/.npmrc.example.txt": f"//registry.npmjs.org/:_authToken={_secret('npm-token', 'web/.npmrc.example.txt')}\n",
        "release/pypirc.txt": f"[pypi]\nusername = __token__\npassword = {_secret('pypi-token', 'release/pypirc.txt')}\n",
        "src/mail.py": f'SENDGRID = "{_secret("sendgrid-key", "src/mail.py")}"\n',
        "ml/download.py": f"snapshot_download(repo, token='{_secret('huggingface-token', 'ml/download.py')}')\n",
        "tests/fixtures/session.txt": f"Authorization: Bearer {_JWT}\n",
        "config/database.yml": f"production:\n  url: postgres://app:{_secret('url-password', 'config/database.yml')}@db.internal:5432/app\n",
        "config/azure.txt": (
            "DefaultEndpointsProtocol=https;AccountName=shop;"
            f"AccountKey={_secret('azure-storage-key', 'config/azure.txt')};EndpointSuffix=core.windows.net\n"
        ),
        "notes/server-key.txt": f"The old server key, kept here for now:\n{_PEM}\n",
        "deploy/kubeconfig.yaml": (
            "users:\n- name: admin\n  user:\n"
            f"    client-certificate-data: {CERTIFICATE_B64}\n"
            f"    client-key-data: {_KUBE_KEY}\n"
        ),
        "deploy/service-account.json": (
            '{\n  "type": "service_account",\n  "project_id": "shop-prod",\n'
            f'  "private_key_id": "{_secret("gcp-private-key-id", "deploy/service-account.json")}",\n'
            f'  "private_key": "{_SA_KEY.replace(chr(10), chr(92) + "n")}\\n",\n'
            '  "client_email": "deploy@shop-prod.iam.gserviceaccount.com"\n}\n'
        ),
        "src/settings.py": f'DEBUG = False\nDB_PASSWORD = "{_secret("secret-assignment", "src/settings.py")}"\n',
        "deploy/app.conf": f"[auth]\napi_token = {_secret('secret-assignment', 'deploy/app.conf')}\n",
    }


CERTIFICATE_B64 = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n" + _chars(B64, 128).encode()).decode()
# A secret committed and removed by the next commit, and two never committed.
COMMITTED_THEN_REMOVED = ("src/feature.py", "ghp_" + _chars(ALNUM, 36))
UNCOMMITTED_EDIT = ("src/settings.py", "sk_live_" + _chars(ALNUM, 24))
UNTRACKED_FILE = ("scratch/try.py", "xoxp-" + _chars(string.digits, 12) + "-" + _chars(ALNUM, 32))

BAIT = {
    "src/bait.py": (
        "import os\n"
        'token = os.environ["GITHUB_TOKEN"]\n'
        'api_key = request.headers.get("X-Api-Key")\n'
        'OPENAI_API_KEY = "<your-api-key>"\n'
        'api_key = "YOUR_API_KEY_HERE"\n'
        'token = "xxxxxxxxxxxxxxxxxxxx"\n'
        'password_field = "password"\n'
        'TOKEN_URL = "https://oauth2.googleapis.com/token"\n'
        'commit = "e83c5163316f89bfbde7d9ab23ca2e25604af290"\n'
        'secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"\n'
        'expected_token_digest = "d41d8cd98f00b204e9800998ecf8427e"\n'
        'session_token_id = "123e4567-e89b-12d3-a456-426614174000"\n'
        "pwd = os.getcwd()\n"
        "def get_secret(name):\n    return vault.read(name)\n"
        'CLONE = "https://user@github.com/org/repo.git"\n'
        'DATABASE_URL = "postgres://user:${PGPASSWORD}@localhost/db"\n'
        'LOCAL_DB = "postgres://postgres:postgres@localhost/dev"\n'
        "secret_key = settings.SECRET_KEY\n"
        "API_TOKEN=os.environ.get\n"
    ),
    "docs/config.md": (
        "Set `password: ${DB_PASSWORD}` in the YAML, or `api_key: <your-key>`.\n"
        "AWS keys start with AKIA; GitHub tokens with ghp_.\n"
    ),
    "deploy/ca.yaml": f"clusters:\n- cluster:\n    certificate-authority-data: {CERTIFICATE_B64}\n",
}
