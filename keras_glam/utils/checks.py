"""Argument checks shared by the library's classes and functions."""


def check_positive_integers(**values):
    """Raise one `ValueError` naming the first argument that is not an integer >= 1.

    Example:
    >>> check_positive_integers(batch_size=8, steps=0)
    Traceback (most recent call last):
        ...
    ValueError: `steps` must be an integer >= 1. Received: 0
    """
    for name, value in values.items():
        # A bool is an int to Python, never a count to a caller.
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1. Received: {value!r}")
