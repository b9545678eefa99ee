"""Prefect flows (one per stage) and the ``sad`` command line."""
