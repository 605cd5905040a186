"""kdlib.params: list parameters in every form a parameters cell or ``papermill -p`` gives them."""

from __future__ import annotations

import numpy as np
import pytest

from kdlib import KDLibError
from kdlib.params import int_tuple, parse_seeds

PROFILE_SEEDS = (0, 1, 2)


@pytest.mark.parametrize(
    "value, expected",
    [
        (7, (7,)),
        ([7], (7,)),
        ((7, 8), (7, 8)),
        ([0, 1, 2], (0, 1, 2)),
        (np.int64(3), (3,)),
        # papermill -p turns "7" into the int 7 but passes anything else as text:
        ("7", (7,)),
        ("[7]", (7,)),
        ("7,8", (7, 8)),
        ("[7, 8]", (7, 8)),
        ("(7, 8)", (7, 8)),
        (" 7 8 ", (7, 8)),
        ("[7,\n 8,]", (7, 8)),
    ],
)
def test_every_form_gives_the_same_tuple(value, expected):
    assert parse_seeds(value, default=PROFILE_SEEDS) == expected


@pytest.mark.parametrize("value", [None, "None", " None "])
def test_none_means_the_profiles_seeds(value):
    assert parse_seeds(value, default=PROFILE_SEEDS) == PROFILE_SEEDS
    assert parse_seeds(value, default=[0]) == (0,)


def test_the_result_is_a_tuple_of_plain_ints():
    seeds = parse_seeds([np.int32(4), 5], default=PROFILE_SEEDS)
    assert seeds == (4, 5)
    assert all(type(s) is int for s in seeds)


@pytest.mark.parametrize(
    "value",
    [7.0, "7.5", True, [True], -1, "[-1]", [1, -2], "", "[]", [], (), "seven", "[7, 8", "7]", "0x7",
     "٣", ["7"], [[7]], {7}, {"seed": 7}, [7, 7], "7,7"],
)
def test_anything_else_is_a_clear_error(value):
    with pytest.raises(KDLibError, match="SEEDS") as err:
        parse_seeds(value, default=PROFILE_SEEDS)
    assert "\n" not in str(err.value)  # one line, as the CLI prints it


def test_the_message_names_the_parameter_and_the_value():
    with pytest.raises(KDLibError) as err:
        int_tuple("7;8", name="N_RUNS")
    assert str(err.value).startswith("N_RUNS must be a non-negative integer")
    assert "'7;8'" in str(err.value)
