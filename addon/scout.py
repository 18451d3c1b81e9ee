"""The script mitmproxy loads: ``mitmdump -s addon/scout.py --mode reverse:http://127.0.0.1:8000``.

mitmproxy puts this file's folder on sys.path, so the package next to it imports from a checkout
(relative imports do not work in a ``-s`` script). All logic lives in the package; the list of
addons is in ``scout_diff_cache.mitm``.
"""

from scout_diff_cache.mitm import make_addons

addons = make_addons()
