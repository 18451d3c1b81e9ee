"""The chat completions API: request parsing and splicing, errors, routes, access rules, SSE and usage."""
