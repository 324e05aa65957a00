"""The errors the course expects and can explain.

A ``CourseError`` is a known problem with a known fix (a flag out of range, a malformed file, a
cached stage that was cut short). Its message is one line that names the file, line, stage or flag
and says what to do. The command line prints that line alone on stderr and exits with status 2; no
traceback, because there is nothing in the stack a learner needs to read.
"""

from __future__ import annotations


class CourseError(Exception):
    """Known bad input or state: the message is the whole story (what, where, and the fix)."""

    exit_status = 2


class MissingCheckpointError(CourseError, FileNotFoundError):
    """A local checkpoint the course needs is not there; the message says how to build it."""


class HubUnreachableError(CourseError, OSError):
    """A hub model or data set could not be fetched; the message names the offline profile."""
