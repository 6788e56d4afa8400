import pytest

from keras_glam.utils.checks import check_positive_integers


def test_names_the_first_argument_that_is_not_a_count():
    check_positive_integers(batch_size=1, steps=10**9)
    for bad in (0, -3, 2.0, True, None, "8"):
        with pytest.raises(ValueError) as error:
            check_positive_integers(batch_size=8, steps=bad)
        assert str(error.value) == f"`steps` must be an integer >= 1. Received: {bad!r}"
