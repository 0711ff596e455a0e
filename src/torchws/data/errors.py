"""Exceptions raised by torchws.data (the CLI maps DatasetNotFoundError to exit code 2)."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are in none of the searched directories; the message says where it looked and how to get it."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is not in the expected format; the message names the file and what was wrong."""
