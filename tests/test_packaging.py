"""The installed distribution claims one top-level name, ``loco``, and ``import loco`` is the
public API without loading torch until a name is used."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.conftest import REPO


def test_the_wheel_installs_everything_under_loco(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("loco-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"loco"}, tops
    for module in ("loco/__init__.py", "loco/swarm.py", "loco/node/daemon.py", "loco/optim/diloco.py",
                   "loco/protocols/collective.py", "loco/protocols/codecs/quantize.py", "loco/pipeline_parts.py",
                   "loco/node/pipeline/node.py", "loco/protocols/pipeline/plan.py"):
        assert module in names


def test_import_loco_is_light_and_exposes_the_public_api():
    code = ("import sys, loco; light = 'torch' not in sys.modules; "
            "names = [n for n in loco.__all__ if n != '__version__']; "
            "missing = [n for n in names if getattr(loco, n, None) is None]; print(light, missing)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.stdout.split() == ["True", "[]"], out.stderr
