"""The registry and plugin discovery in-process: lazy attribute access, error messages that list options, the
safe backend helpers, observers called one plugin at a time, per-kind laziness read from the source.

Plugins here are registered at run time through the ``kvsieve_registry`` fixture (discovery is reset around
each test); throwaway modules live in ``tmp_path``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import kvsieve
from kvsieve import discovery, plugins
from kvsieve.backends.torch_ref import TorchBackend
from kvsieve.discovery import static_hook_names
from kvsieve.plugins import PluginConflictError, PluginLoadWarning, UnknownNameError


def test_import_kvsieve_exposes_plugins_lazily_and_stays_light():
    probe = (
        "import sys, kvsieve;"
        "heavy = sorted(m for m in ('torch', 'transformers', 'kvsieve.policies.rpc') if m in sys.modules);"
        "names = kvsieve.plugins.registry().names('compressor');"
        "print(heavy, 'snapkv' in names, 'none' in names)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True", "True"]


# ------------------------------------------------------------------------------------------ error messages
def test_a_compressor_without_parameters_says_so(kvsieve_registry):
    with pytest.raises(
        ValueError, match=r"^compressor 'none' has no parameter 'ratio'\. It takes no parameters\.$"
    ):
        kvsieve_registry.create("compressor", "none", ratio=0.2)


def test_a_compressor_with_parameters_lists_them(kvsieve_registry):
    with pytest.raises(ValueError, match=r"Did you mean 'window'\? Its parameters: .*window"):
        kvsieve_registry.create("compressor", "snapkv", windw=4)


def test_an_unknown_name_when_nothing_is_registered_says_so(monkeypatch):
    monkeypatch.setattr(discovery, "ENTRY_POINT_GROUP", "kvsieve-test-nothing-here")
    plugins.reset()
    try:
        with pytest.raises(UnknownNameError, match=r"^unknown backend 'torch'\. No backend is registered\.$"):
            plugins.registry().get("backend", "torch")
    finally:
        plugins.reset()


def test_an_unknown_kind_lists_the_kinds(kvsieve_registry):
    with pytest.raises(ValueError, match="unknown registry kind 'policy'; the kinds are scoring, selection, backend"):
        kvsieve_registry.names("policy")


class _Empty:
    """A plugin with no hook."""


def test_registering_a_plugin_name_twice_raises(kvsieve_registry):
    kvsieve_registry.register(_Empty(), name="twice")
    with pytest.raises(PluginConflictError, match="'twice'"):
        kvsieve_registry.register(_Empty(), name="twice")


def test_an_unhashable_plugin_object_is_refused_and_breaks_nothing(kvsieve_registry):
    with pytest.raises(TypeError, match="unhashable"):
        kvsieve_registry.register(SimpleNamespace(), name="unhashable")
    assert "none" in kvsieve_registry.names("compressor")


def test_plugin_sources_are_not_kept_on_pluggys_manager(kvsieve_registry):
    kvsieve_registry.register(_Empty(), name="plain", distribution="plain-dist 1")
    manager = plugins.plugin_manager()
    assert not [attr for attr in vars(manager) if attr.startswith("_kvsieve")]
    assert plugins.registry().get("backend", "torch").source.builtin


# ------------------------------------------------------------------------------------------ backends
class _Flaky(TorchBackend):
    """Answers ``available()`` once (when the registry is built), then raises."""

    name = "flaky"
    auto_priority = 100
    calls = 0

    def available(self):
        type(self).calls += 1
        if type(self).calls > 1:
            raise OSError("device went away")
        return True, ""


class _FlakyPlugin:
    @kvsieve.hookimpl
    def kvsieve_backends(self):
        return {"flaky": _Flaky}


def test_backend_helpers_report_a_raising_available_and_never_raise(kvsieve_registry):
    _Flaky.calls = 0
    kvsieve_registry.register(_FlakyPlugin(), name="flaky-plugin", distribution="flaky-dist 0.1")
    reg = kvsieve_registry.registry
    assert "flaky" in reg.names("backend")  # its first available() answered
    with pytest.warns(PluginLoadWarning, match="device went away") as caught:
        ok, why = reg.backend_status("flaky")
        best = reg.available_backends("cpu", torch.float32)
    assert not ok and why == "its availability check raised OSError: device went away"
    assert [type(b).__name__ for b in best][0] == "TorchBackend"
    assert all(not isinstance(b, _Flaky) for b in best)
    assert len([w for w in caught if "device went away" in str(w.message)]) == 1  # reported once
    (problem,) = [p for p in reg.problems() if p.name == "flaky"]
    assert problem.kind == "backend" and problem.source.distribution == "flaky-dist 0.1"
    assert reg.backend_status("torch") == (True, "")
    assert reg.backend_status("torch", "cpu", torch.float32) == (True, "")


def test_available_backends_puts_the_highest_priority_first(kvsieve_registry):
    class Eager(TorchBackend):
        name = "eager"
        auto_priority = 50

    class Plugin:
        @kvsieve.hookimpl
        def kvsieve_backends(self):
            return {"eager": Eager}

    kvsieve_registry.register(Plugin(), name="eager-plugin")
    names = [b.name for b in kvsieve_registry.registry.available_backends("cpu", torch.float32)]
    assert names[:2] == ["eager", "torch"]


# ------------------------------------------------------------------------------------------ observers
def test_observers_are_called_one_by_one_and_a_raising_one_never_aborts(kvsieve_registry):
    calls = []

    class Raising:
        @kvsieve.hookimpl
        def kvsieve_layer_compressed(self, layer_idx, phase, before, after, info):
            calls.append(("raising", layer_idx))
            raise KeyError("boom")

    class Recording:
        @kvsieve.hookimpl
        def kvsieve_layer_compressed(self, layer_idx, phase, before, after, info):
            calls.append(("recording", layer_idx))

    kvsieve_registry.register(Raising(), name="raising", distribution="a-raising 1")
    kvsieve_registry.register(Recording(), name="recording", distribution="b-recording 1")
    assert plugins.has_layer_compressed_observers()
    with pytest.warns(PluginLoadWarning) as caught:
        for layer in range(3):
            plugins.notify_layer_compressed(layer, "decode", before=10, after=5, info={"compressor": "x"})
    assert sorted(calls) == sorted([(who, layer) for who in ("raising", "recording") for layer in range(3)])
    (message,) = [str(w.message) for w in caught]
    assert "a-raising 1" in message and "raising (registered at run time)" in message and "KeyError" in message


# ------------------------------------------------------------------------------------------ static read
def _module(tmp_path, monkeypatch, name: str, source: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import kvsieve\n@kvsieve.hookimpl\ndef kvsieve_backends():\n    return {}\n", {"kvsieve_backends"}),
        ("from elsewhere import kvsieve_compressors as kvsieve_compressors\n", {"kvsieve_compressors"}),
        ('"""Implements ``kvsieve_layer_compressed``."""\n', {"kvsieve_layer_compressed"}),
        ("x = 1\n", set()),
        ("from elsewhere import *\n", None),
        ("import sys\nsetattr(sys.modules[__name__], 'hook', 1)\n", None),
        ("KIND = 'backends'\nNAME = 'kvsieve_' + KIND\n", None),
        ("def __getattr__(name):\n    return None\n", None),
        ("def broken(:\n", None),
    ],
    ids=["def", "import", "docstring", "none", "star", "setattr", "built-name", "module-getattr", "syntax-error"],
)
def test_static_hook_names_reads_the_source_without_importing(tmp_path, monkeypatch, source, expected):
    name = _module(tmp_path, monkeypatch, f"kvsieve_static_probe_{abs(hash(source))}", source)
    found = static_hook_names(name)
    assert (None if found is None else set(found)) == expected
    assert name not in sys.modules


def test_a_package_parent_is_not_imported_to_read_a_submodule(tmp_path, monkeypatch):
    package = tmp_path / "kvsieve_static_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('must not run')\n")
    (package / "hooks.py").write_text("def kvsieve_compressors():\n    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert static_hook_names("kvsieve_static_pkg.hooks") == {"kvsieve_compressors"}
    assert "kvsieve_static_pkg" not in sys.modules


def test_a_hook_the_source_did_not_show_still_counts_once_loaded(tmp_path, monkeypatch):
    """A plugin whose static read misses a hook: once it is imported (for another kind), the tables built
    before are rebuilt, so its contribution is not lost."""
    module = _module(
        tmp_path,
        monkeypatch,
        "kvsieve_hidden_hook",
        """
        import kvsieve
        from kvsieve.policies.full import FullCache
        from kvsieve.policies.window_attention import WindowAttentionScoring

        @kvsieve.hookimpl
        def kvsieve_compressors():
            return {"hidden_full": FullCache}

        @kvsieve.hookimpl
        def kvsieve_scoring_policies():
            return {"hidden_scoring": WindowAttentionScoring}
        """,
    )
    dist = tmp_path / "kvsieve_hidden-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvsieve-hidden\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[kvsieve]\nhidden = {module}\n")
    real = discovery.static_hook_names
    monkeypatch.setattr(
        discovery,
        "static_hook_names",
        lambda name: frozenset({"kvsieve_compressors"}) if name == module else real(name),
    )
    plugins.reset()
    try:
        reg = plugins.registry()
        assert "hidden_scoring" not in reg.names("scoring")  # not imported: its source showed no scoring hook
        assert module not in sys.modules
        assert "hidden_full" in reg.names("compressor")  # imported now
        assert "hidden_scoring" in reg.names("scoring")  # and the scoring table was rebuilt
    finally:
        plugins.reset()
        sys.modules.pop(module, None)


def test_a_backend_that_cannot_be_created_is_skipped(kvsieve_registry):
    class NeedsArgs(TorchBackend):
        name = "needs_args"

        def __init__(self, path):
            self.path = path

    class Plugin:
        @kvsieve.hookimpl
        def kvsieve_backends(self):
            return {"needs_args": NeedsArgs}

    kvsieve_registry.register(Plugin(), name="needs-args-plugin", distribution="needs-args 2.0")
    with pytest.warns(PluginLoadWarning, match="creating it raised TypeError"):
        names = kvsieve_registry.names("backend")
    assert "needs_args" not in names and "torch" in names
