import json
import math

import pytest

from lorax_variants import AdapterSpec


def test_scale_lora_and_rslora():
    assert AdapterSpec(targets="w", r=16, alpha=32).scale_for("w") == 2.0
    assert AdapterSpec(targets="w", r=16, alpha=32, rslora=True).scale_for("w") == 32 / math.sqrt(16)


def test_rank_and_alpha_patterns_first_match_wins():
    spec = AdapterSpec(
        targets=".*",
        r=8,
        alpha=8,
        rank_pattern={r"layers/0/.*": 4, r"layers/.*": 2},
        alpha_pattern={r".*/v": 32},
    )
    assert spec.rank_for("layers/0/q") == 4
    assert spec.rank_for("layers/1/q") == 2
    assert spec.rank_for("head") == 8
    assert spec.alpha_for("layers/3/v") == 32.0
    assert spec.scale_for("layers/0/v") == 32 / 4


def test_round_trips_through_json_and_is_hashable():
    spec = AdapterSpec(targets=["a", "b"], r=4, rank_pattern={"a": 2}, init="pissa", stacked="layers/.*")
    back = AdapterSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec
    assert hash(back) == hash(spec)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "AdapterSpec.r"),
        ({"r": 2.5}, "AdapterSpec.r"),
        ({"alpha": -1}, "AdapterSpec.alpha"),
        ({"alpha": float("nan")}, "AdapterSpec.alpha"),
        ({"init": "xavier"}, "AdapterSpec.init"),
        ({"dropout": 1.0}, "AdapterSpec.dropout"),
        ({"targets": []}, "AdapterSpec.targets"),
        ({"targets": "("}, "AdapterSpec.targets"),
        ({"rank_pattern": {"a": 0}}, r"AdapterSpec.rank_pattern\['a'\]"),
        ({"alpha_pattern": {"a": "x"}}, r"AdapterSpec.alpha_pattern\['a'\]"),
        ({"stacked": "["}, "AdapterSpec.stacked"),
        ({"dtype": "int8"}, "AdapterSpec.dtype"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    args = {"targets": "w", **kwargs}
    with pytest.raises((ValueError, TypeError), match=field):
        AdapterSpec(**args)


def test_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown AdapterSpec field\(s\) \['rank'\]"):
        AdapterSpec.from_dict({"targets": "w", "rank": 4})
