"""Prefect tasks: thin wrappers over ``sad`` functions that add retries and logging."""
