"""The one exception type users see.

Every problem the user can fix (bad config, bad data, missing files) is raised as a `SlimtuneError` whose message
names the file / line / key at fault and says what to do. The CLI prints the message (no traceback) and exits 2.
"""


class SlimtuneError(Exception):
    """A problem with the user's input, reported as one clear message."""
