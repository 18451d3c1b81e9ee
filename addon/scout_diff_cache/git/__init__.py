"""Read-only access to the git repository: plumbing, patch text, path exclusions, the change watcher."""
