"""Prefect tasks: thin, typed wrappers around stemlib calls (retries, caching, logging)."""
