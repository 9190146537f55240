"""Process-local measurements that the database cannot answer (exported on ``/metrics``).

Only the listener's C-STORE handling time lives here: it is measured in the process that
handles the association, which is the process that serves ``/metrics`` next to it. Everything
else on ``/metrics`` is derived from the database (``pacs_ai.web.metrics``), so it is right
whichever process (``serve``, ``worker``, a pipeline child) did the work.
"""

from __future__ import annotations

from prometheus_client import Histogram

# Not registered in prometheus_client's global registry: the web app registers it in its own.
CSTORE_SECONDS = Histogram(
    "pacs_ai_cstore_handling_seconds",
    "Time from a complete C-STORE request to its response (place, fsync, validate, record).",
    ["outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=None,
)


def observe_store(seconds: float, ok: bool) -> None:
    CSTORE_SECONDS.labels("success" if ok else "failure").observe(seconds)
