#!/bin/sh
# The image's entry point:
#   serve [FLAGS]   llmserve serve (the default; settings also from LLMSERVE_* variables)
#   health          exit 0 while GET /health answers 200 (the HEALTHCHECK)
#   COMMAND ...     anything else, run as given (llmserve chat, a shell, ...)
set -eu
case "${1:-serve}" in
serve)
    [ $# -gt 0 ] && shift
    exec llmserve serve "$@"
    ;;
health)
    exec python3 - <<'PY'
import os, sys, urllib.request
host = os.environ.get("LLMSERVE_HEALTH_HOST", "127.0.0.1")
url = f"http://{host}:{os.environ.get('LLMSERVE_PORT', '8000')}/health"
try:
    with urllib.request.urlopen(url, timeout=4) as reply:
        sys.exit(0 if reply.status == 200 else 1)
except Exception as exc:  # 503 (an engine down), refused, timed out
    print(f"unhealthy: {url}: {exc}", file=sys.stderr)
    sys.exit(1)
PY
    ;;
*)
    exec "$@"
    ;;
esac
