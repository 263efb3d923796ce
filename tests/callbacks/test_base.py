"""The hook table is the one source: the base class, its diagram, the docs and the vectorized
path's check all follow it."""

import re
from pathlib import Path

from pl_federated.callbacks.base import HOOK_NAMES, HOOKS, FederatedCallback, overrides
from pl_federated.loops.vectorized import UNSUPPORTED_HOOKS

ROOT = Path(__file__).resolve().parents[2]


def test_every_hook_in_the_table_is_a_method_and_nothing_else_is():
    methods = {
        name
        for name, value in vars(FederatedCallback).items()
        if callable(value) and not name.startswith("_") and name not in ("add_round_state",)
    }
    assert methods == set(HOOK_NAMES)


def test_the_docstring_diagram_lists_the_hooks_in_call_order():
    doc = FederatedCallback.__doc__
    positions = [doc.index(f"{name}(") for name in HOOK_NAMES]
    assert positions == sorted(positions)


def test_docs_extending_lists_every_hook_in_call_order():
    text = (ROOT / "docs" / "extending.md").read_text()
    table = [m.group(1) for m in re.finditer(r"^\| `(\w+)\(", text, re.MULTILINE)]
    hooks = [name for name in table if name in HOOK_NAMES]
    assert hooks == [h for h in HOOK_NAMES if h in hooks]
    missing = set(HOOK_NAMES) - set(table) - {"supervised_weight", "supervised_loss"}
    assert not missing
    assert "`supervised_weight(" in text and "`supervised_loss(" in text


def test_vectorized_check_is_derived_from_the_table():
    assert tuple(h.name for h in HOOKS if h.inside_update) == UNSUPPORTED_HOOKS
    assert "on_client_end" not in UNSUPPORTED_HOOKS and "client_loss" in UNSUPPORTED_HOOKS


def test_overrides_sees_only_implemented_hooks():
    class Loss(FederatedCallback):
        def client_loss(self, fed, client, role, batch, outputs):
            return None

    assert overrides(Loss(), "client_loss") and not overrides(Loss(), "on_round_end")
