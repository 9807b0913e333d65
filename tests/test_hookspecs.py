"""``longlora_plugin.hookspecs``: the pluggy extension point for architecture names."""

from __future__ import annotations

from longlora_plugin.hookspecs import get_plugin_manager, hookimpl, names_from_hooks


class _Returns:
    def __init__(self, names):
        self.names = names

    @hookimpl
    def longlora_trainable_module_names(self, config, kind):
        return self.names if kind == "norm" else None


def test_one_manager_per_process():
    assert get_plugin_manager() is get_plugin_manager()


def test_no_implementation_returns_names_means_none():
    assert names_from_hooks(object(), "norm") is None


def test_names_of_every_implementation_united_in_call_order():
    manager = get_plugin_manager()
    impls = [_Returns(["a", "b"]), _Returns(["b", "c"]), _Returns(None)]
    for impl in impls:
        manager.register(impl)
    try:
        names = names_from_hooks(object(), "norm")
        assert sorted(names) == ["a", "b", "c"] and len(names) == 3
        assert names_from_hooks(object(), "embed") is None
    finally:
        for impl in impls:
            manager.unregister(impl)
