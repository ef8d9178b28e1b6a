"""calc_speedup refuses arguments that describe no network, saying what they mean."""
import numpy as np
import pytest

from utils import calc_speedup


@pytest.mark.parametrize("growth_rate,layers", [(12, 0), (12, -3), (0, 12), (-12, 12), (12, 12.0),
                                                (12.5, 12), (12, float("nan"))])
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


@pytest.mark.parametrize("t_0", ["0.8", b"0.8", None, True, [0.8]])
def test_a_t_0_that_is_not_a_number_is_refused(t_0):
    # calc_speedup(12, 12, "0.8") used to return the estimate for 0.8.
    with pytest.raises(TypeError) as refused:
        calc_speedup(12, 12, t_0)
    message = str(refused.value)
    assert "\n" not in message and "t_0 must be a number" in message and repr(t_0) in message


@pytest.mark.parametrize("depth,per_block", [(40, 6), (76, 12), (100, 16), (190, 31), (250, 41)])
def test_the_depth_of_a_paper_densenet_is_refused_naming_its_layers_per_block(depth, per_block):
    # calc_speedup(12, 76, 0.8) used to return 0.167, the estimate for a network of depth 460.
    with pytest.raises(ValueError) as refused:
        calc_speedup(12, depth, 0.8)
    message = str(refused.value)
    assert "\n" not in message
    assert f"did you mean the depth L={depth}? Its layers per block would be {per_block}" in message
    assert f"is the depth L={6 * depth + 4}" in message
    assert calc_speedup(12, per_block, 0.8) > 0  # what the user meant


@pytest.mark.parametrize("layers", [1, 6, 12, 16, 31, 34, 39, 41, 45, 77])
def test_layers_per_block_that_are_no_densenet_bc_depth_are_accepted(layers):
    # 16 and 34 are DenseNet-BC depths too (2 and 5 layers per block), but below the paper's
    # smallest, 40: values that small are read as counts. 41 and 77 are no depth at all.
    assert 0 < calc_speedup(12, layers, 0.8) < 1


def test_the_scripts_estimate_a_deep_densenet_whose_layers_per_block_look_like_a_depth():
    # -L 244 has 40 layers per block: models.py computes them from the depth, so they are no mistake.
    import models

    assert models.paper_speedup("densenet", 244, 12, 0.8, "cubic") == pytest.approx(
        models.paper_speedup("densenet", 250, 12, 0.8, "cubic"), abs=0.01)


# -- one rule (issue 29, item 6): a non-number is a TypeError naming the argument, a number out of
# range a ValueError.
@pytest.mark.parametrize("args,name", [
    (("12", 12, 0.8, "cubic"), "growth_rate"), ((None, 12, 0.8), "growth_rate"), ((True, 12, 0.8), "growth_rate"),
    ((12, "12", 0.8), "n_dense_blocks"), ((12, None, 0.8), "n_dense_blocks"), ((12, [12], 0.8), "n_dense_blocks"),
    ((12, 12, "0.8"), "t_0"), ((12, 12, None), "t_0"),
    ((12, 12, 0.8, 3), "how_scale"), ((12, 12, 0.8, None), "how_scale"),
])
def test_an_argument_that_is_not_a_number_is_a_type_error_naming_it(args, name):
    with pytest.raises(TypeError) as refused:
        calc_speedup(*args)
    message = str(refused.value)
    assert "\n" not in message and not isinstance(refused.value, ValueError)
    assert f"{name} must be" in message


@pytest.mark.parametrize("args,name", [
    ((0, 12, 0.8), "growth_rate"), ((12.5, 12, 0.8), "growth_rate"), ((12, -1, 0.8), "n_dense_blocks"),
    ((12, 76, 0.8), "n_dense_blocks"), ((12, 12, 1.5), "t_0"), ((12, 12, 0.0), "t_0"),
    ((12, 12, 0.8, "quadratic"), "how_scale"),
])
def test_a_number_out_of_range_is_a_value_error_naming_it(args, name):
    with pytest.raises(ValueError) as refused:
        calc_speedup(*args)
    assert name in str(refused.value) and not isinstance(refused.value, TypeError)
