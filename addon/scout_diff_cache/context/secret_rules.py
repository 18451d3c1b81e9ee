"""The secret formats the proxy redacts: (kind, RE2 pattern) pairs, each with exactly one capture group.

The group is what is replaced; what surrounds it (a key name, ``AccountKey=``) stays, so the code
still reads. Vendor formats are exact (a prefix and a length), so they need no further check;
the *generic* kinds (a secret-looking name assigned a quoted or bare value) are also checked for
entropy and against placeholders in ``secrets.py``. Patterns are RE2 (no look-around, no
back-references): all of them compile into one automaton that scans each byte once. Repetitions
have no upper bound: bounds multiply the automaton's states (1.6x slower), and the ends are fixed
by what follows (``\b``, a quote, a separator) anyway.
"""

from __future__ import annotations

_B64 = r"[A-Za-z0-9+/]"
# "PRIVATE KEY" in base64, at each of its three alignments: a PEM private key block, base64-encoded
# (kubeconfig client-key-data, Helm values). A certificate's base64 is public and is left alone.
_B64_PRIVATE_KEY = r"(?:UFJJVkFURSBLRV|BSSVZBVEUgS0VZ|QUklWQVRFIEtFW)"
_SECRET_NAME = (
    r"(?:password|passwd|passphrase|secret|token|api[_\-]?key|apikey|access[_\-]?key|auth[_\-]?key|"
    r"client[_\-]?secret|private[_\-]?key|credentials?)"
)

VENDOR_RULES: tuple[tuple[str, str], ...] = (
    ("private-key", r"(?s)(-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----"
                    r".*?-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----)"),
    ("private-key-base64", rf"(LS0tLS1CRUdJTi{_B64}{{0,}}{_B64_PRIVATE_KEY}{_B64}*=*)"),
    ("aws-access-key-id", r"\b((?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16})\b"),
    ("aws-secret-access-key", r"(?i)aws_?secret_?(?:access_?)?key[\"']?\s{0,}[:=]{1,}\s{0,}"
                              r"[\"']?([A-Za-z0-9/+=]{40})\b"),
    ("github-token", r"\b((?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36})\b"),
    ("github-fine-grained-token", r"\b(github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59})\b"),
    ("gitlab-token", r"\b(gl(?:pat|ptt|dt|rt|oas)-[A-Za-z0-9_\-]{20,})"),
    ("slack-token", r"\b(xox[abposr]-[0-9A-Za-z\-]{10,})"),
    ("slack-webhook", r"(https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9+/_\-]{30,})"),
    ("stripe-key", r"\b((?:sk|rk)_(?:live|test)_[0-9A-Za-z]{20,})\b"),
    ("openai-key", r"\b(sk-(?:proj|svcacct|admin)-[A-Za-z0-9_\-]{40,}|sk-[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20})"),
    ("anthropic-key", r"\b(sk-ant-(?:api|admin)\d{2}-[A-Za-z0-9_\-]{80,})"),
    ("google-api-key", r"\b(AIza[0-9A-Za-z_\-]{35})"),
    ("npm-token", r"\b(npm_[A-Za-z0-9]{36})\b"),
    ("pypi-token", r"\b(pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,})"),
    ("sendgrid-key", r"\b(SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43})\b"),
    ("huggingface-token", r"\b(hf_[A-Za-z]{34})\b"),
    ("jwt", r"\b(eyJ[A-Za-z0-9_\-]{10,}\.eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{16,})"),
    ("azure-storage-key", r"(?i)AccountKey=([A-Za-z0-9+/]{86}==)"),
    ("gcp-private-key-id", r"\"private_key_id\"\s*:\s*\"([a-f0-9]{40})\""),
)  # fmt: skip

GENERIC_RULES: tuple[tuple[str, str], ...] = (
    # scheme://user:password@host (a password that is a ${VARIABLE} or a word stays)
    ("url-password", r"\b[a-zA-Z][a-zA-Z0-9+.\-]{1,}://[^\s:/@\"'<>]{1,}:([^\s:/@\"'<>]{3,})@[A-Za-z0-9.\-\[]"),
    # name = "value" / name: 'value' / "name": "value" / name := "value" (any case, within a line)
    (
        "secret-assignment",
        rf"(?i){_SECRET_NAME}[a-z0-9_.\-]*[\"']?[ \t]{{0,}}(?::=|=>|==?|:)[ \t]{{0,}}[\"']([^\"'\s]{{8,}})[\"']",
    ),
    # NAME=value in .env, shell, ini and YAML files, bare (a patch's +/- prefix allowed)
    (
        "secret-assignment",
        rf"(?im)^[+\- ]?[ \t]*(?:export[ \t]+)?[a-z0-9_.\-]*{_SECRET_NAME}[a-z0-9_.\-]*[ \t]*[:=][ \t]*"
        r"([A-Za-z0-9+/=_\-.~]{12,})[ \t]*$",
    ),
)

GENERIC_KINDS = frozenset(kind for kind, _ in GENERIC_RULES)
URL_KIND = "url-password"
RULES = (*VENDOR_RULES, *GENERIC_RULES)
