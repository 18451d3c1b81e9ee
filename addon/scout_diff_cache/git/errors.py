"""The one error every git operation raises."""


class GitError(Exception):
    """A git operation failed; the message says which and why, for the 500 envelope."""
