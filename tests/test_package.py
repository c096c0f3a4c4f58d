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
