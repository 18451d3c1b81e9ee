"""The context messages: their framing, the snapshot, the history blocks, the working diff, and the provider."""
