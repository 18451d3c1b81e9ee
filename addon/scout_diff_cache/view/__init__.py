"""The text of mitmweb's "Scout chat" view: requests, snapshots, responses and streams, as a person reads them."""
