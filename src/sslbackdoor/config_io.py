"""Config plumbing every layer may use: a strict pydantic base, YAML read without aliases,
`--set KEY=VALUE` overrides, `scales:` blocks and one-line validation errors.

The experiments' own config models live above the layers they name (`sslbackdoor.config`
for the BadEncoder experiment, each kind's module for its own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from sslbackdoor.errors import UserInputError, first_line


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    location = ".".join(str(p) for p in first["loc"]) or "(top level)"
    extra = f" ({len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    return f"{source}: {location}: {first['msg']}{extra}"


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=value` strings → nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"--set {item!r}: expected KEY=VALUE, e.g. attack.epochs=5")
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserInputError(f"--set {item!r}: an earlier --set gave {part!r} a value, "
                                     f"so it has no fields to set")
        try:
            node[parts[-1]] = load_yaml_text(raw)
        except yaml.YAMLError as exc:
            raise UserInputError(f"--set {item!r}: the value is not a YAML scalar or list "
                                 f"({_yaml_problem(exc)})") from None
    return nested


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        elif isinstance(merged.get(key), list) and isinstance(value, dict):
            merged[key] = _merge_list(merged[key], value)
        else:
            merged[key] = value
    return merged


def _merge_list(items: list[Any], override: dict[str, Any]) -> list[Any]:
    """`targets.0.target_class=3` indexes into lists."""
    items = list(items)
    for index, value in override.items():
        if not index.isdigit() or int(index) >= len(items):
            raise UserInputError(f"--set: list index {index!r} is out of range 0..{len(items) - 1}")
        position = int(index)
        items[position] = (deep_merge(items[position], value) if isinstance(value, dict)
                           and isinstance(items[position], dict) else value)
    return items


def merged_config(source: dict[str, Any] | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A config dict or YAML file with `--set KEY=VALUE` overrides applied (not validated)."""
    raw = read_yaml(source) if isinstance(source, Path) else source
    return deep_merge(raw, parse_overrides(overrides or []))


def select_scale(raw: dict[str, Any], scale: str | None, label: str = "config") -> dict[str, Any]:
    """Merge the `scales: {NAME: {...overrides}}` block named `scale` (default: small)
    over the rest of a config; a config without `scales` is returned unchanged."""
    scales = raw.get("scales")
    if scales is None:
        if scale is not None:
            raise UserInputError(f"--scale {scale}: {label} has no `scales` block")
        return raw
    if not isinstance(scales, dict) or not all(isinstance(v, dict) for v in scales.values()):
        raise UserInputError(f"{label}: `scales` must map names to override mappings")
    name = scale or "small"
    if name not in scales:
        raise UserInputError(f"--scale {name}: {label} has scales {', '.join(scales)}")
    base = {k: v for k, v in raw.items() if k != "scales"}
    return deep_merge(base, scales[name])


MAX_CONFIG_BYTES = 1 << 20  # shipped experiments are ~2 KB


class NoAliasLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses aliases (`*name`, `<<: *name`) as it meets them.

    Config files never need them, and a few nested aliases ("billion laughs") stand for
    billions of nodes once a config is merged, validated or written back out.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not allowed in config files; "
                            f"write the value out", event.start_mark)
        return super().compose_node(parent, index)


def load_yaml_text(text: str) -> Any:
    """YAML text → Python objects, without aliases (see `NoAliasLoader`)."""
    return yaml.load(text, Loader=NoAliasLoader)  # a SafeLoader: builds no arbitrary objects


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UserInputError(f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; "
                                 f"a config file is a few KB of YAML")
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"config file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path} is not valid YAML ({_yaml_problem(exc)})") from None
    except OSError as exc:
        raise UserInputError(f"cannot read config file {path} ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path} must hold a YAML mapping at the top level")
    return data


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's messages span lines (problem, then position); one line holding both."""
    return " ".join(str(exc).split())[:200]


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
