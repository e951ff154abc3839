"""User-facing errors: problems a user can fix (bad input, missing files, corrupt data).

The CLI prints them as one clear message and exits with status 2, without a traceback.
"""


class UserError(Exception):
    """An error caused by the user's input, with a message that says what is wrong and what to do."""
