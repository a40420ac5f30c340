"""Prefect flows of stemflow and its command line (``stemflow``)."""
