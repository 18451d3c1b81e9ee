"""The ``scout-diff-cache`` command: run the proxy (mitmdump or mitmweb with the addons), preview, doctor."""
