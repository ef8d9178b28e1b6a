"""calc_speedup refuses arguments that describe no network, saying what they mean."""
import numpy as np
import pytest

from utils import calc_speedup


@pytest.mark.parametrize("growth_rate,layers", [(12, 0), (12, -3), (0, 12), (-12, 12), (12, 12.0),
                                                (12.5, 12), (True, 12), (12, None)])
def test_values_that_describe_no_densenet_are_refused(growth_rate, layers):
    with pytest.raises(ValueError) as refused:
        calc_speedup(growth_rate, layers, 0.8)
    message = str(refused.value)
    assert "must be a positive integer" in message
    if growth_rate == 12:  # the second argument: its 2017 meaning, spelled out
        assert "n_dense_blocks" in message and "layers in each dense block" in message
        assert "12 for L=76" in message
    else:
        assert "growth_rate" in message


def test_the_issue_example_no_longer_returns_a_number():
    # calc_speedup(12, 0, 0.8) used to return 0.244 (and 0.177 for growth rate -12).
    with pytest.raises(ValueError, match="12 for L=76"):
        calc_speedup(12, 0, 0.8)
    with pytest.raises(ValueError, match="growth_rate"):
        calc_speedup(-12, 12, 0.8)


def test_integer_types_other_than_int_still_work():
    assert calc_speedup(np.int64(12), np.int32(12), 0.8) == calc_speedup(12, 12, 0.8)
    assert round(calc_speedup(12, 12, 0.8, "cubic"), 6) == 0.177813
