"""What the proxy learns about the cache: verdicts and their causes, token counts, metrics, prewarm."""
