"""Helpers for the resume, crash-safety, multi-host and guard tests."""
