"""Serving benchmark client (`moe-runtime bench serve`): workload.py (what to send), runner.py (when),
targets.py (where: gRPC or the HTTP API), report.py (what it measured, as pure functions)."""
