"""Plugin faults: a broken third-party plugin is reported in one line naming its distribution and entry point,
and skipped; the built-ins, ``kvsieve plugins`` and generation keep working.

Each faulty plugin is a throwaway distribution (a module and a ``*.dist-info`` with ``entry_points.txt``) in a
temporary directory, put on ``PYTHONPATH`` of a fresh subprocess, so that this test process never sees it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test starts a fresh interpreter (torch, transformers): ~10 s on CPU

# Runs in the subprocess: `kvsieve plugins --json` in-process, then (optionally) a short generation on the tiny
# random Llama with backend="auto"; prints one JSON report line with every warning seen.
PROBE = r"""
import contextlib, io, json, sys, warnings

report = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from kvsieve.cli import main

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            report["plugins_rc"] = main(["plugins", "--json"])
        report["plugins"] = json.loads(out.getvalue())
    except BaseException as exc:
        report["plugins_error"] = repr(exc)
    compressor = sys.argv[1]
    if compressor:
        try:
            import kvsieve
            from kvsieve import models

            model, tokenizer = models.load("tiny-random-llama")
            batch = tokenizer(["a prompt long enough for the tiny model to compress a little " * 2],
                              return_tensors="pt")
            result = kvsieve.generate(model, batch.input_ids, batch.attention_mask, compressor=compressor,
                                      params=json.loads(sys.argv[2]), backend="auto", max_new_tokens=3,
                                      min_new_tokens=3, do_sample=False)
            report["generated"], report["backend"] = result.generated_tokens, result.backend
        except BaseException as exc:
            report["generate_error"] = repr(exc)
report["warnings"] = [str(w.message) for w in caught]
print("REPORT " + json.dumps(report))
"""

SNAPKV = ("snapkv", {"window": 4, "ratio": 0.5})


def make_dist(root: Path, name: str, modules: dict[str, str], entry_points: dict[str, str]) -> Path:
    """A distribution ``name 1.0`` in ``root`` (made if needed): its modules and its ``kvsieve`` entry points."""
    root.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[kvsieve]\n{lines}")
    return root


def run_python(paths: list[Path], *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=paths[0], capture_output=True, text=True, timeout=timeout
    )


def probe(paths: list[Path], compressor: tuple[str, dict] | None = None) -> dict:
    name, params = compressor or ("", {})
    done = run_python(paths, "-c", PROBE, name, json.dumps(params))
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("REPORT "))


def assert_kvsieve_works(report: dict, generated: bool = True) -> None:
    """``kvsieve plugins`` exited 0 and listed the built-ins; the generation (if any) ran."""
    assert "plugins_error" not in report, report.get("plugins_error")
    assert report["plugins_rc"] == 0
    names = {kind: {row["name"]: row for row in report["plugins"][kind]} for kind in ("backend", "compressor")}
    assert {"none", "snapkv", "rpc"} <= set(names["compressor"]) and "torch" in names["backend"]
    assert names["compressor"]["none"]["distribution"].startswith("kvsieve ")
    if generated:
        assert "generate_error" not in report, report.get("generate_error")
        assert report["generated"] == 3


def the_problem(report: dict, distribution: str, entry_point: str, text: str) -> dict:
    """The one listed problem of ``distribution``/``entry_point`` whose message holds ``text``; and its warning."""
    found = [
        p
        for p in report["plugins"]["problems"]
        if p["distribution"] == distribution and p["entry_point"] == entry_point and text in p["message"]
    ]
    assert len(found) == 1, report["plugins"]["problems"]
    warned = [w for w in report["warnings"] if text in w]
    assert len(warned) == 1 and "\n" not in warned[0], report["warnings"]
    assert f"distribution {distribution!r}" in warned[0] and f"entry point {entry_point!r}" in warned[0]
    return found[0]


# ------------------------------------------------------------------------------------------------ the faults
def test_backend_whose_available_raises_is_skipped_and_auto_still_works(tmp_path):
    site = make_dist(
        tmp_path / "site",
        "fault-backend",
        {
            "fault_backend": """
                import kvsieve
                from kvsieve.backends.torch_ref import TorchBackend

                class Exploding(TorchBackend):
                    name = "exploding"
                    auto_priority = 100  # auto would pick it first

                    def available(self):
                        raise RuntimeError("driver probe crashed")

                @kvsieve.hookimpl
                def kvsieve_backends():
                    return {"exploding": Exploding}
            """
        },
        {"exploding": "fault_backend"},
    )
    report = probe([site], SNAPKV)
    assert_kvsieve_works(report)
    assert report["backend"] == "torch"
    assert "exploding" not in {row["name"] for row in report["plugins"]["backend"]}
    problem = the_problem(report, "fault-backend 1.0", "exploding = fault_backend", "driver probe crashed")
    assert problem["kind"] == "backend" and problem["name"] == "exploding"


def test_third_party_name_clash_with_a_builtin_keeps_the_builtin(tmp_path):
    site = make_dist(
        tmp_path / "site",
        "fault-clash",
        {
            "fault_clash": """
                import attrs
                import kvsieve
                from kvsieve.policies.full import FullCache

                @attrs.frozen
                class Impostor(FullCache):
                    pass

                @kvsieve.hookimpl
                def kvsieve_compressors():
                    return {"none": Impostor, "clash_extra": Impostor}
            """
        },
        {"clash": "fault_clash"},
    )
    report = probe([site], ("none", {}))
    assert_kvsieve_works(report)
    compressors = {row["name"]: row for row in report["plugins"]["compressor"]}
    assert compressors["clash_extra"]["distribution"] == "fault-clash 1.0"  # its other name is kept
    problem = the_problem(report, "fault-clash 1.0", "clash = fault_clash", "'none' is already taken")
    assert problem["kind"] == "compressor" and problem["name"] == "none"
    assert "kvsieve " in problem["message"] and "built-ins keep their names" in problem["message"]

    listing = run_python([site], "-m", "kvsieve.cli", "plugins")  # the text listing shows it too
    assert listing.returncode == 0, listing.stderr
    problems = listing.stdout.split("Problems:\n", 1)[1]
    assert "none" in problems and "fault-clash 1.0" in problems and "already taken" in problems


def test_two_third_party_plugins_clashing_keep_the_first_distribution_by_name(tmp_path):
    source = """
        import kvsieve
        from kvsieve.policies.full import FullCache

        class Mine(FullCache):
            pass

        @kvsieve.hookimpl
        def kvsieve_compressors():
            return {"shared": Mine}
    """
    # zeta comes first on sys.path (so first among the entry points); alpha wins all the same
    zeta = make_dist(tmp_path / "zeta", "zeta-plugin", {"zeta_plugin": source}, {"shared": "zeta_plugin"})
    alpha = make_dist(tmp_path / "alpha", "alpha-plugin", {"alpha_plugin": source}, {"shared": "alpha_plugin"})
    report = probe([zeta, alpha])
    assert_kvsieve_works(report, generated=False)
    compressors = {row["name"]: row for row in report["plugins"]["compressor"]}
    assert compressors["shared"]["distribution"] == "alpha-plugin 1.0"
    problem = the_problem(report, "zeta-plugin 1.0", "shared = zeta_plugin", "'shared' is already taken")
    assert "alpha-plugin 1.0" in problem["message"]


def test_a_raising_observer_warns_once_and_generation_goes_on(tmp_path):
    site = make_dist(
        tmp_path / "site",
        "fault-observer",
        {
            "fault_observer": """
                import kvsieve

                @kvsieve.hookimpl
                def kvsieve_layer_compressed(layer_idx, phase, before, after, info):
                    raise ZeroDivisionError("observer bug")
            """
        },
        {"observer": "fault_observer"},
    )
    report = probe([site], SNAPKV)  # the listing runs before the generation: only the warning tells
    assert_kvsieve_works(report)
    warned = [w for w in report["warnings"] if "observer bug" in w]
    assert len(warned) == 1, report["warnings"]  # reported once, although it raised on every compressed layer
    assert "'fault-observer 1.0'" in warned[0] and "'observer = fault_observer'" in warned[0]
    assert "ZeroDivisionError" in warned[0] and "\n" not in warned[0]


def test_invalid_contributions_are_reported_and_the_valid_ones_kept(tmp_path):
    site = make_dist(
        tmp_path / "site",
        "fault-values",
        {
            "fault_values": """
                import kvsieve
                from kvsieve.policies.full import FullCache
                from kvsieve.policies.window_attention import WindowAttentionScoring

                @kvsieve.hookimpl
                def kvsieve_scoring_policies():
                    return {3: WindowAttentionScoring, "good_scoring": WindowAttentionScoring,
                            "bad name": WindowAttentionScoring, "not_a_class": "window_attention"}

                @kvsieve.hookimpl
                def kvsieve_selection_policies():
                    return ["topk"]

                @kvsieve.hookimpl
                def kvsieve_backends():
                    return {"plain_object": object}

                @kvsieve.hookimpl
                def kvsieve_compressors():
                    return {"forty_two": 42, "good_compressor": FullCache, "wrong_class": WindowAttentionScoring}
            """
        },
        {"values": "fault_values"},
    )
    report = probe([site])
    assert_kvsieve_works(report, generated=False)
    listed = {kind: {row["name"] for row in report["plugins"][kind]} for kind in ("scoring", "compressor")}
    assert {"good_scoring", "window_attention"} <= listed["scoring"]
    assert "good_compressor" in listed["compressor"]
    entry_point = "values = fault_values"
    for text in (
        "key 3 (int); names must be strings",
        "'bad name' is not allowed",
        "scoring 'not_a_class' is 'window_attention', expected a subclass of kvsieve.policy.ScoringPolicy",
        "returned ['topk'], expected a mapping",
        "backend 'plain_object' is <class 'object'>, expected a subclass of kvsieve.backend.KVBackend",
        "compressor 'forty_two' is 42, expected a Compressor subclass or a factory",
        "WindowAttentionScoring, which is not a kvsieve.Compressor subclass",
    ):
        the_problem(report, "fault-values 1.0", entry_point, text)


def test_a_misspelt_or_undecorated_hook_warns(tmp_path):
    site = make_dist(
        tmp_path / "site",
        "fault-spelling",
        {
            "fault_spelling": """
                import kvsieve
                from kvsieve.policies.full import FullCache

                @kvsieve.hookimpl
                def kvsieve_compresors():
                    return {"never_seen": FullCache}

                def kvsieve_scoring_policies():  # forgot @kvsieve.hookimpl
                    return {}
            """
        },
        {"spelling": "fault_spelling"},
    )
    report = probe([site])
    assert_kvsieve_works(report, generated=False)
    entry_point = "spelling = fault_spelling"
    problem = the_problem(report, "fault-spelling 1.0", entry_point, "unknown hook 'kvsieve_compresors'")
    assert "did you mean 'kvsieve_compressors'?" in problem["message"]
    the_problem(report, "fault-spelling 1.0", entry_point, "kvsieve_scoring_policies() without @kvsieve.hookimpl")


def test_a_plugin_calling_sys_exit_at_import_is_reported(tmp_path):
    site = make_dist(
        tmp_path / "site",
        "fault-exit",
        {
            "fault_exit": """
                import sys
                sys.exit(3)

                import kvsieve

                @kvsieve.hookimpl
                def kvsieve_compressors():
                    return {}
            """
        },
        {"exiting": "fault_exit"},
    )
    done = run_python([site], "-m", "kvsieve.cli", "plugins")
    assert done.returncode == 0, done.stderr
    assert "Compressors:" in done.stdout and "snapkv" in done.stdout and "Problems:" in done.stdout
    lines = [line for line in done.stderr.splitlines() if "sys.exit(3)" in line]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "'fault-exit 1.0'" in lines[0] and "'exiting = fault_exit'" in lines[0]


def test_discovery_is_lazy_per_kind_and_a_slow_import_is_reported(tmp_path):
    site = make_dist(
        tmp_path / "site",
        "fault-slow",
        {
            "fault_slow": """
                import pathlib, time
                import kvsieve
                from kvsieve.policies.window_attention import WindowAttentionScoring

                pathlib.Path(__file__).with_name("imported").write_text("yes")
                time.sleep(1.5)

                @kvsieve.hookimpl
                def kvsieve_scoring_policies():
                    return {"slow_scoring": WindowAttentionScoring}
            """
        },
        {"slow": "fault_slow"},
    )
    marker = site / "imported"
    for argv in (["--help"], ["eval", "report", str(tmp_path / "no-run"), "--out", str(tmp_path / "out")]):
        done = run_python([site], "-m", "kvsieve.cli", *argv)
        assert done.returncode in (0, 2) and "Traceback" not in done.stderr, done.stderr
        assert not marker.exists(), f"kvsieve {' '.join(argv)} imported a plugin"
    script = r"""
import json, sys, warnings
from pathlib import Path
marker = Path(sys.argv[1])
seen = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import kvsieve
    reg = kvsieve.plugins.registry()
    seen["after_registry"] = marker.exists()
    reg.get("compressor", "none"); reg.backend("torch"); reg.get("selection", "topk")
    seen["after_other_kinds"] = marker.exists()
    seen["scoring"] = reg.names("scoring")
    seen["after_scoring"] = marker.exists()
seen["warnings"] = [str(w.message) for w in caught]
print("REPORT " + json.dumps(seen))
"""
    done = run_python([site], "-c", script, str(marker))
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.split("REPORT ", 1)[1])
    assert seen["after_registry"] is False and seen["after_other_kinds"] is False
    assert seen["after_scoring"] is True and "slow_scoring" in seen["scoring"]
    (warned,) = [w for w in seen["warnings"] if "slow import" in w]
    assert "'fault-slow 1.0'" in warned and "'slow = fault_slow'" in warned
    assert float(warned.split("slow import: ")[1].split(" s")[0]) >= 1.5
