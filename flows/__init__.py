"""Prefect flows: the only place that imports Prefect. Thin wiring over the domain packages."""

import os

# Offline by default (Prefect otherwise phones home), and show the domain packages' progress
# logs in flow runs. Set before Prefect is imported; users can override any of these.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "preprocessing,dedup,dcgan")

import logging  # noqa: E402

for _name in ("preprocessing", "dedup", "dcgan"):
    logging.getLogger(_name).setLevel(logging.INFO)
