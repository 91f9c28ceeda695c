"""Test-wide settings, applied before any test imports Ray."""

import os

# Keep every Ray process of the tests (local runtimes, multi-node test clusters, `ray start` heads) on
# 127.0.0.1: with this, Ray takes the loopback address as the node IP instead of the machine's.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
