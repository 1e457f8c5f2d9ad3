"""The patch mechanism (vllm_ampere.patching) on small fake targets."""

import sys
import types

import pytest

from vllm_ampere.patching import Patch, PatchTargetMoved


@pytest.fixture
def fake_module():
    mod = types.ModuleType("fake_stock")

    def add(x, y):
        return x + y

    class Engine:
        def step(self, n):
            return n

        @staticmethod
        def build(parser):
            return [parser]

    class Child(Engine):
        pass

    mod.add, mod.Engine, mod.Child = add, Engine, Child
    sys.modules["fake_stock"] = mod
    yield mod
    del sys.modules["fake_stock"]


def _patch(target, signature, replace, **kw):
    return Patch(name="p", target=target, signature=signature, why="w", how="h",
                 vllm_checked="0.32.0", processes=("workers",), remove_when="never",
                 replace=replace, **kw)


def _times_ten(orig):
    return lambda x, y: orig(x, y) * 10


def test_apply_function_and_keep_original(fake_module):
    p = _patch("fake_stock:add", "(x, y)", _times_ten)
    assert p.apply() is True
    assert fake_module.add(1, 2) == 30
    assert fake_module.add.__wrapped__(1, 2) == 3
    assert p.is_applied() and p.original()(1, 2) == 3


def test_idempotent(fake_module):
    p = _patch("fake_stock:add", "(x, y)", _times_ten)
    assert p.apply() is True
    assert p.apply() is False  # already installed: nothing happens, no double wrap
    assert fake_module.add(1, 2) == 30


def test_method_and_staticmethod(fake_module):
    _patch("fake_stock:Engine.step", "(self, n)", lambda orig: lambda self, n: orig(self, n) + 1).apply()
    assert fake_module.Engine().step(1) == 2
    _patch("fake_stock:Engine.build", "(parser)", lambda orig: lambda parser: orig(parser) * 2).apply()
    assert isinstance(vars(fake_module.Engine)["build"], staticmethod)
    assert fake_module.Engine.build("x") == ["x", "x"]


@pytest.mark.parametrize("target, match", [
    ("fake_stock:missing", "is gone"),
    ("fake_stock:Missing.step", "is gone"),
    ("fake_stock_gone:add", "module fake_stock_gone is gone"),
    ("fake_stock:Child.step", "is gone"),  # inherited, not Child's own: the target moved
    ("fake_stock", "no ':attr' part"),
])
def test_moved_target_refuses_loudly(fake_module, target, match):
    p = _patch(target, "", _times_ten)
    with pytest.raises(PatchTargetMoved, match=match):
        p.apply()


def test_changed_signature_refuses(fake_module):
    p = _patch("fake_stock:add", "(x, y, z)", _times_ten)
    with pytest.raises(PatchTargetMoved, match=r"changed signature.*\(x, y, z\).*found \(x, y\)"):
        p.apply()
    assert fake_module.add(1, 2) == 3  # nothing installed


def test_not_needed_is_skipped(fake_module):
    p = _patch("fake_stock:add", "(x, y)", _times_ten, needed=lambda: False)
    assert p.apply() is False
    assert fake_module.add(1, 2) == 3
