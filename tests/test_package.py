import subprocess
import sys

import kvslim


def test_import_has_no_heavy_side_effects():
    code = "import sys, kvslim; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_every_public_name_resolves():
    for name in kvslim.__all__:
        assert getattr(kvslim, name) is not None, name


def test_unknown_attribute_is_an_attribute_error():
    try:
        kvslim.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_subpackages_are_reachable_after_a_plain_import():
    code = "import kvslim; print(callable(kvslim.models.load), callable(kvslim.cache.make_cache), kvslim.quant.CODEC_NAMES[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "fp32"]


def test_no_import_circles():
    """spec / presets / spec_hf and eval.runner / eval.executors import in one direction only."""
    import ast
    from pathlib import Path

    src = Path(kvslim.__file__).parent

    def imports(rel: str) -> set[str]:
        tree = ast.parse((src / rel).read_text())
        return {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}

    assert not {"presets", "spec_hf"} & imports("plan/spec.py")
    assert "presets" not in imports("plan/spec_hf.py")
    assert "runner" not in imports("eval/harness/executors.py")
    assert "models" not in imports("cache/methods/latent/calibration.py") and "....models" not in imports("cache/methods/latent/calibration.py")


def test_architecture_page_lists_every_method():
    """docs/architecture.md's method table names every registered built-in, in registry order."""
    import re
    from pathlib import Path

    from kvslim.cache.methods import BUILTIN

    page = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    listed = re.findall(r"^\| `(\w+)` \| ", page, flags=re.M)
    assert tuple(listed) == BUILTIN


def test_method_families_are_declared_by_the_classes():
    """Each method class declares its family (what the benchmarks read); it matches the package that holds it."""
    from kvslim.cache.method import methods
    from kvslim.cache.methods import BUILTIN, FAMILY

    found = methods()
    assert {n: found[n].family for n in BUILTIN} == {n: FAMILY.get(n, "") for n in BUILTIN}
    for n in BUILTIN:
        assert found[n].__module__.split(".")[3:-1] == ([FAMILY[n]] if n in FAMILY else [])
