"""scout-diff-cache: a mitmproxy addon that puts a whole git repository in front of every chat request."""

__version__ = "0.1.0"
