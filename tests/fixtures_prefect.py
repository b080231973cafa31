"""Prefect server fixtures for tests: see infra/prefect_server.py."""
