"""The one exception type for user mistakes (bad config, missing files, bad values).

Entry points catch it and print its message as a single line with a non-zero exit code: no traceback,
because the user's fix is in their input, not in our code.
"""


class UserError(Exception):
    """A mistake in the user's input. The message names the offending key, file or value."""


class PeerFailed(Exception):
    """This rank cannot go on because another rank failed with an unexpected error, which that rank reports: the
    entry point waits for its report and exits quietly. The message says what failed, for when no report comes."""


class Stopped(Exception):
    """A clean stop before the end, every rank together (preemption): state is saved; the message says how
    to continue."""
