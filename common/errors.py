"""One error type for bad input, so the CLI can print one clear line and exit non-zero."""


class FedmergeError(Exception):
    """Bad input or a refused operation; the message names the file, field and what was expected."""
