"""`render_report` dispatches each experiment kind with a report of its own."""

from __future__ import annotations

import importlib

import pytest

from sslbackdoor.report import KIND_RENDERERS
from sslbackdoor.runners import KIND_MODULES


@pytest.mark.parametrize("kind", sorted(KIND_RENDERERS))
def test_every_kind_renderer_imports_and_names_a_registered_kind(kind: str) -> None:
    module, function = KIND_RENDERERS[kind]
    assert callable(getattr(importlib.import_module(module), function))
    assert kind in KIND_MODULES
