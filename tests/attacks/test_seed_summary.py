"""The across-seeds table of `corruptencoder` results, and its refusals."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from sslbackdoor.attacks.seed_summary import seed_table
from sslbackdoor.errors import UserInputError


def _results(seed: int, rows: list[tuple[str, bool, float, float, float]]) -> dict[str, Any]:
    return {"kind": "corruptencoder", "name": "corruptencoder", "seed": seed,
            "config": {"seed": seed, "trigger_size": 8, "poison_ratio": 0.01,
                       "methods": sorted({r[0] for r in rows}), "localized_crop": [False]},
            "rows": [{"method": m, "localized_crop": loc, "asr": a8 / 100,
                      "asr_enlarged": {"16": a16 / 100, "24": a24 / 100}}
                     for m, loc, a8, a16, a24 in rows]}


def test_rows_line_up_by_method_and_crop_with_a_mean_over_the_seeds_that_ran_them() -> None:
    seed0 = _results(0, [("corruptencoder", False, 1.0, 40.0, 100.0),
                         ("poisonedencoder", False, 2.0, 80.0, 100.0),
                         ("corruptencoder", True, 1.0, 2.0, 76.0)])
    seed1 = _results(1, [("poisonedencoder", False, 1.0, 1.0, 10.0),
                         ("corruptencoder", False, 0.0, 20.0, 84.0)])
    lines = seed_table([seed1, seed0]).splitlines()
    assert lines[0].startswith("ASR (%) at trigger sizes 8 / 16 / 24 px")
    assert lines[2] == "| method | crop | seed 0 | seed 1 | mean |"
    assert lines[4] == ("| CorruptEncoder | standard | 1.00 / 40.00 / 100.00 | "
                        "0.00 / 20.00 / 84.00 | 0.50 / 30.00 / 92.00 (n=2) |")
    assert lines[5] == ("| CorruptEncoder | localized | 1.00 / 2.00 / 76.00 | – | "
                        "1.00 / 2.00 / 76.00 (n=1) |")
    assert lines[6] == ("| PoisonedEncoder | standard | 2.00 / 80.00 / 100.00 | "
                        "1.00 / 1.00 / 10.00 | 1.50 / 40.50 / 55.00 (n=2) |")
    # Ranked: standard-crop rows of every seed (the localized row ran at seed 0 only).
    assert lines[-3:] == ["- 8 px: PoisonedEncoder 1.50 > CorruptEncoder 0.50",
                          "- 16 px: PoisonedEncoder 40.50 > CorruptEncoder 30.00",
                          "- 24 px: CorruptEncoder 92.00 > PoisonedEncoder 55.00"]


def test_results_of_another_config_are_refused_naming_the_difference() -> None:
    seed0 = _results(0, [("clean", False, 0.3, 0.0, 0.0)])
    seed1 = copy.deepcopy(seed0) | {"seed": 1}
    seed1["config"] = seed1["config"] | {"seed": 1, "poison_ratio": 0.05}
    with pytest.raises(UserInputError, match="differs from seed 0 in poison_ratio"):
        seed_table([seed0, seed1])


def test_repeated_seeds_and_other_kinds_are_refused() -> None:
    seed0 = _results(0, [("clean", False, 0.3, 0.0, 0.0)])
    with pytest.raises(UserInputError, match="seeds repeat"):
        seed_table([seed0, copy.deepcopy(seed0)])
    with pytest.raises(UserInputError, match="needs corruptencoder results"):
        seed_table([seed0 | {"kind": "grid"}])
