"""Plumbing several stages share: params, errors, files (atomic writes, hashes), MLflow tracking, Ray."""
