"""The script mitmproxy loads: ``mitmdump -s addon/scout.py --mode reverse:http://127.0.0.1:8000``.

mitmproxy puts this file's folder on sys.path, so the package next to it imports from a checkout
(relative imports do not work in a ``-s`` script). All logic lives in the package.
"""

from scout_diff_cache.addon import ScoutDiffCache

addons = [ScoutDiffCache()]
