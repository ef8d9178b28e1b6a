"""The paper's speedup estimate, `calc_speedup`, for DenseNet-BC: the same numbers as the 2017
code, importable as its users import it (`from utils import calc_speedup`). The FLOP-based
estimate for any model is the library's (freezeout/estimate.py); the data sets are in
data_sets.py.
"""
from __future__ import annotations

import math
import numbers

from freezeout import SCALE_POWERS, check_how_scale, check_t_0


def calc_speedup(growth_rate: int, n_dense_blocks: int, t_0: float, how_scale: str = "cubic") -> float:
    """Estimated fraction of training FLOPs saved by FreezeOut on a DenseNet-BC (paper Eqs. 2-3).

    Arguments keep the 2017 positional order. `n_dense_blocks` is, as in 2017, the number of
    layers in each of the three dense blocks (12 for L=76), not the number of blocks.

    Counts the convolution FLOPs of the stem and of every bottleneck layer (transitions are
    left out), takes backward = forward, and lets unit i skip its backward for the last
    1 - t_i of the run. As in the 2017 code, tau_i uses i / (number of counted layers) and the
    linear strategy's result is multiplied by 1.3, which the paper says corrects its
    underestimate. Scaled and unscaled strategies have the same estimate.

    >>> round(calc_speedup(12, 12, 0.8, "cubic"), 6)
    0.177813

    An argument that is not a number at all (the string "12", None; how_scale not a string) is
    a TypeError naming it; a number out of range (0 layers, 12.5, t_0 = 1.5) a ValueError naming
    it. A second argument that looks like a depth L of DenseNet-BC (76, say) is refused: see
    `_check_not_a_depth`; `densenet_bc_speedup` takes the layers per block without that check.
    """
    _check_count("growth_rate", growth_rate, GROWTH_RATE)
    _check_count("n_dense_blocks", n_dense_blocks, LAYERS_PER_BLOCK)
    _check_not_a_depth(n_dense_blocks)
    return densenet_bc_speedup(growth_rate, n_dense_blocks, t_0, how_scale)


GROWTH_RATE = "the DenseNet growth rate k, 12 in the paper"
LAYERS_PER_BLOCK = "the number of layers in each dense block, (L - 4) / 6: 12 for L=76"


def densenet_bc_speedup(growth_rate: int, layers_per_block: int, t_0: float,
                        how_scale: str = "cubic") -> float:
    """`calc_speedup` for a DenseNet-BC whose layers per block were computed from its depth
    (by models.py), so that they cannot be the depth passed by mistake: any number of layers."""
    _check_count("growth_rate", growth_rate, GROWTH_RATE)
    _check_count("n_dense_blocks", layers_per_block, LAYERS_PER_BLOCK)
    if not isinstance(how_scale, str):  # a str that is no strategy: check_how_scale's ValueError
        raise TypeError(f"calc_speedup: how_scale must be a string, one of {', '.join(SCALE_POWERS)}; "
                        f"got {type(how_scale).__name__} {how_scale!r}")
    t_0, power = check_t_0(t_0), SCALE_POWERS[check_how_scale(how_scale)]
    n_dense_blocks, k = layers_per_block, growth_rate
    costs = [3 * 2 * k * 32 * 32 * 9]  # stem: 3 -> 2k channels, 3x3, at 32x32
    n = 2  # input channels of the next layer, in units of k
    for block in range(3):
        hw = (32 // 2 ** block) ** 2
        for _ in range(n_dense_blocks):
            costs.append(n * k * 4 * k * hw + 4 * 9 * k * k * hw)  # 1x1 to 4k, then 3x3 to k
            n += 1
        n = math.floor(n * 0.5)  # transition compression
    t = [(t_0 + (1 - t_0) * i / len(costs)) ** power for i in range(len(costs))]
    freezeout_cost = sum(costs) + sum(c * t_i for c, t_i in zip(costs, t, strict=True))
    speedup = 1 - freezeout_cost / (2 * sum(costs))
    return 1.3 * speedup if how_scale == "linear" else speedup


def _check_count(name: str, value, meaning: str) -> None:
    """A count of channels or layers: a positive integer. What is not a number at all (a
    string "12", None, a bool) is a TypeError; a number that is no count (12.0, 0, -3: with
    these the formula would return a number for no network) a ValueError. Both name it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"calc_speedup: {name} must be a number, a positive integer ({meaning}); "
                        f"got {type(value).__name__} {value!r}")
    if not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"calc_speedup: {name} is {meaning}; it must be a positive integer, got {value!r}")


# The smallest depth of the paper's DenseNet-BCs (L = 40, 76, 100, 190, 250).
SMALLEST_PAPER_DEPTH = 40


def _check_not_a_depth(layers_per_block: int) -> None:
    """Refuse a second argument that looks like the depth L passed where the layers per block
    are meant: a depth of DenseNet-BC ((L - 4) divisible by 6) from the paper's smallest, 40,
    up. As layers per block such a value means a network of depth 6 * value + 4 >= 244 that
    nobody trains on CIFAR; as a depth it is a common mistake that would give a wrong number."""
    value = int(layers_per_block)
    if value >= SMALLEST_PAPER_DEPTH and (value - 4) % 6 == 0:
        raise ValueError(f"calc_speedup: n_dense_blocks={value} looks like a DenseNet-BC depth L, but the "
                         f"argument is the number of layers in each dense block, (L - 4) / 6: did you "
                         f"mean the depth L={value}? Its layers per block would be {(value - 4) // 6} "
                         f"({value} layers per block is the depth L={6 * value + 4})")
