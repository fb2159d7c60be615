"""Third-party plugins: the example package is installed, discovered and run the way a user's would be, and
broken plugins (clashing names, raising hooks, failing imports) are reported without breaking kvsieve.

The example (``examples/kvsieve-keynorm``) is pip-installed, offline, into a temporary target directory put
on ``sys.path`` for this module only; ``kvsieve.plugins.reset()`` makes kvsieve scan the entry points again.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvsieve
from kvsieve import plugins
from kvsieve.integration import generate
from kvsieve.plugins import PluginLoadWarning

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kvsieve-keynorm"


def _forget_module(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def keynorm_installed(tmp_path_factory):
    """The example plugin, installed by pip (``--no-deps --no-build-isolation --no-index``) into a dir."""
    work = tmp_path_factory.mktemp("keynorm")
    source = shutil.copytree(
        EXAMPLE,
        work / "source",
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"),
    )  # build in the copy, not the repo
    target = work / "site-packages"
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--disable-pip-version-check",
        "--target",
        str(target),
        str(source),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, f"pip could not install the example plugin:\n{done.stdout}\n{done.stderr}"
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    plugins.reset()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        _forget_module("kvsieve_keynorm")
        plugins.reset()


# ------------------------------------------------------------------------------------------------ the example
def test_example_is_discovered_with_its_distribution(keynorm_installed):
    reg = plugins.registry()
    for kind in ("scoring", "compressor"):
        entry = reg.get(kind, "keynorm")
        assert (
            str(entry.source)
            == "distribution 'kvsieve-keynorm 0.1.0', entry point 'keynorm = kvsieve_keynorm.keynorm'"
        )
        module = sys.modules[entry.obj.__module__]
        assert Path(module.__file__).is_relative_to(
            keynorm_installed
        )  # the installed copy, not the source tree
    assert reg.get("selection", "topk").source.distribution == f"kvsieve {kvsieve.__version__}"


@pytest.mark.parametrize(
    ("compressor", "params"),
    [("keynorm", {"ratio": 0.5}), ("snapkv", {"scoring": "keynorm", "window": 4, "ratio": 0.5})],
    ids=["keynorm", "snapkv-scoring-keynorm"],
)
def test_example_runs_through_the_public_api(keynorm_installed, tiny_model, tiny_batch, compressor, params):
    model, tokenizer = tiny_model
    new = 5
    out = generate(
        model,
        tiny_batch.input_ids,
        tiny_batch.attention_mask,
        compressor=compressor,
        params=params,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
    )
    kept = -(-out.prompt_tokens // 2)  # ceil(0.5 * padded prompt), the padding dropped
    assert out.kv_lengths == [kept + new - 1] * model.config.num_hidden_layers
    assert out.sequences.shape == (2, out.prompt_tokens + new)
    assert out.compressor["name"] == compressor
    if compressor == "snapkv":
        assert out.compressor["scoring"] == {"name": "keynorm"}  # a policy's config: its name and parameters


def test_example_own_tests_pass(keynorm_installed, tmp_path):
    """The plugin's own tests (kvsieve's conformance kit, pytest fixtures) pass, run as its author would."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(keynorm_installed), os.environ.get("PYTHONPATH")])),
    )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 passed" in done.stdout


# ------------------------------------------------------------------------------------------- broken plugins
class _Scoring:
    """A throwaway plugin contributing one scoring policy under ``name``."""

    def __init__(self, name: str):
        self.name = name

    @kvsieve.hookimpl
    def kvsieve_scoring_policies(self):
        from kvsieve.policies.window_attention import WindowAttentionScoring

        class Renamed(WindowAttentionScoring):
            pass

        return {self.name: Renamed}


def test_two_plugins_with_one_name_keep_the_first_by_distribution_name(kvsieve_registry):
    # registered in reverse order: precedence is by distribution name, not by registration order
    kvsieve_registry.register(_Scoring("twice"), name="second", distribution="second-dist 2.0")
    kvsieve_registry.register(_Scoring("twice"), name="first", distribution="first-dist 1.0")
    with pytest.warns(PluginLoadWarning, match="'twice'") as caught:
        reg = plugins.registry()
        assert reg.get("scoring", "twice").source.distribution == "first-dist 1.0"
    (message,) = [str(w.message) for w in caught if "'twice'" in str(w.message)]
    assert "second-dist 2.0" in message and "first-dist 1.0" in message and "skipped" in message


def test_a_plugin_cannot_take_a_builtin_name(kvsieve_registry):
    kvsieve_registry.register(_Scoring("window_attention"), name="squatter", distribution="squatter-dist 0.1")
    with pytest.warns(PluginLoadWarning) as caught:
        entry = plugins.registry().get("scoring", "window_attention")
    assert entry.source.distribution == f"kvsieve {kvsieve.__version__}"
    (message,) = [str(w.message) for w in caught if "squatter" in str(w.message)]
    assert f"kvsieve {kvsieve.__version__}" in message and "squatter-dist 0.1" in message


class _RaisingHook:
    @kvsieve.hookimpl
    def kvsieve_scoring_policies(self):
        raise RuntimeError("scoring table is broken")

    @kvsieve.hookimpl
    def kvsieve_compressors(self):
        from kvsieve.policies.full import FullCache

        return {"still-here": FullCache}


def assert_builtin_snapkv_generates(tiny_model, tiny_batch) -> None:
    """The built-in snapkv still runs end to end (after a broken plugin was reported)."""
    model, _ = tiny_model
    out = generate(
        model,
        tiny_batch.input_ids,
        tiny_batch.attention_mask,
        compressor="snapkv",
        params={"window": 4, "ratio": 0.5},
        max_new_tokens=2,
        do_sample=False,
    )
    assert out.sequences.shape[1] == out.prompt_tokens + 2


def test_a_raising_hook_warns_and_everything_else_works(kvsieve_registry, tiny_model, tiny_batch):
    kvsieve_registry.register(_RaisingHook(), name="raiser", distribution="raiser-dist 3.1")
    with pytest.warns(PluginLoadWarning) as caught:  # discovery is lazy: the lookups build the tables
        reg = plugins.registry()
        scoring, compressors = reg.names("scoring"), reg.names("compressor")
    messages = [str(w.message) for w in caught if "scoring table is broken" in str(w.message)]
    assert len(messages) == 1
    assert "raiser-dist 3.1" in messages[0] and "raiser (registered at run time)" in messages[0]
    assert "kvsieve_scoring_policies" in messages[0]
    assert "window_attention" in scoring and "still-here" in compressors
    assert_builtin_snapkv_generates(tiny_model, tiny_batch)


def test_a_plugin_that_fails_to_import_warns_and_builtins_work(
    kvsieve_registry, tmp_path, monkeypatch, tiny_model, tiny_batch
):
    (tmp_path / "kvsieve_broken_plugin.py").write_text(
        'raise ImportError("needs libmissing.so")\n\nimport kvsieve\n\n\n'
        "@kvsieve.hookimpl\ndef kvsieve_compressors():\n    return {}\n"
    )
    dist_info = tmp_path / "kvsieve_broken-0.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvsieve-broken\nVersion: 0.3\n")
    (dist_info / "entry_points.txt").write_text("[kvsieve]\nbroken = kvsieve_broken_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    with pytest.warns(PluginLoadWarning) as caught:  # imported (lazily) when compressors are looked up
        reg = plugins.registry()
        compressors = reg.names("compressor")
    messages = [str(w.message) for w in caught if "libmissing" in str(w.message)]
    assert len(messages) == 1
    assert "'kvsieve-broken 0.3'" in messages[0] and "'broken = kvsieve_broken_plugin'" in messages[0]
    assert "ImportError" in messages[0]
    assert {"topk"} <= set(reg.names("selection")) and {"none", "snapkv"} <= set(compressors)
    assert_builtin_snapkv_generates(tiny_model, tiny_batch)
