"""Config plumbing: scales, merges, `--set` overrides and one-line validation errors.

YAML reading (aliases, size limits, unreadable files) is exercised through `load_config` in
test_config.py.
"""

from pathlib import Path

import pytest
from pydantic import ValidationError

from sslbackdoor.config_io import (
    Strict,
    deep_merge,
    dump_config,
    format_validation_error,
    merged_config,
    read_yaml,
    select_scale,
)
from sslbackdoor.errors import UserInputError


class Point(Strict):
    x: int
    y: int = 0


RAW = {"name": "toy", "attack": {"epochs": 200, "lr": 0.001},
       "scales": {"small": {"attack": {"epochs": 2}}, "paper": {"name": "paper"}}}


def test_select_scale_merges_the_named_block_over_the_rest() -> None:
    assert select_scale(RAW, None) == {"name": "toy", "attack": {"epochs": 2, "lr": 0.001}}
    assert select_scale(RAW, "paper") == {"name": "paper", "attack": {"epochs": 200, "lr": 0.001}}


@pytest.mark.parametrize(("raw", "scale", "message"), [
    ({"name": "toy"}, "small", "--scale small: demo.yaml has no `scales` block"),
    (RAW, "huge", "--scale huge: demo.yaml has scales small, paper"),
    ({"scales": {"small": 3}}, None, "demo.yaml: `scales` must map names to override mappings"),
])
def test_select_scale_errors_name_what_would_be_valid(raw: dict, scale: str | None, message: str) -> None:
    with pytest.raises(UserInputError) as info:
        select_scale(raw, scale, label="demo.yaml")
    assert str(info.value) == message


def test_select_scale_leaves_a_config_without_scales_as_it_is() -> None:
    assert select_scale({"name": "toy"}, None) == {"name": "toy"}


def test_overrides_merge_into_nested_mappings_and_list_items() -> None:
    base = {"a": {"b": 1, "c": 2}, "items": [{"k": 1}, {"k": 2}]}
    merged = merged_config(base, ["a.b=5", "items.1.k=9", "new=[1, 2]"])
    assert merged == {"a": {"b": 5, "c": 2}, "items": [{"k": 1}, {"k": 9}], "new": [1, 2]}
    assert base["a"]["b"] == 1  # the input is not changed
    with pytest.raises(UserInputError, match=r"list index '2' is out of range 0\.\.1"):
        deep_merge(base, {"items": {"2": {"k": 0}}})


def test_validation_error_is_one_line_naming_the_first_field_and_counting_the_rest() -> None:
    with pytest.raises(ValidationError) as info:
        Point.model_validate({"x": "one", "y": "two", "z": 3})
    line = format_validation_error(info.value, "point.yaml")
    assert line.startswith("point.yaml: x: Input should be a valid integer") and line.endswith("(2 more)")


def test_dumped_config_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "point.yaml"
    path.write_text(dump_config(Point(x=3)))
    assert Point.model_validate(read_yaml(path)) == Point(x=3, y=0)
    path.write_text("- a list\n")
    with pytest.raises(UserInputError, match="must hold a YAML mapping at the top level"):
        read_yaml(path)
