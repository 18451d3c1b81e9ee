"""What the addon records on the flows it rewrites, shared by the addon, the trimming and the view."""

from __future__ import annotations

# flow.metadata[METADATA_KEY]: commit, sizes, the context messages' byte spans in the body, the verdict.
METADATA_KEY = "scout_diff_cache"
# A stored flow whose snapshot was trimmed from memory has a system message starting with this.
TRIMMED_SNAPSHOT_PREFIX = "[scout-diff-cache: snapshot"
