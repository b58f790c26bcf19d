"""Docker HEALTHCHECK: exit 0 when the server's readiness endpoint answers 200, 1 otherwise.

GET /ready answers 503 while the engine loads and while the server drains on SIGTERM, so an orchestrator
neither routes to a replica that cannot serve nor kills one that is finishing its requests.
"""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("KILN_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=3) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError):
    sys.exit(1)
