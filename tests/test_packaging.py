"""The package works when installed: a wheel built from the checkout, installed (not editable) into a fresh virtual
environment that reuses the installed torch, runs `mal` from a folder outside the checkout, offline."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mal.config import shipped_configs

REPO = Path(__file__).resolve().parents[1]
IMPORTS = ("torch", "torchvision", "timm", "huggingface_hub", "safetensors", "yaml", "tqdm", "numpy", "PIL",
           "matplotlib", "tensorboard", "mlxtend", "setuptools")        # the dependencies, and the build backend


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 120) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-3000:]}\n" \
                                f"{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin folder, environment, a folder outside the checkout) with the wheel installed."""
    missing = [m for m in IMPORTS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the system site lacks {missing}, which the virtual environment would reuse")
    tmp = tmp_path_factory.mktemp("packaging")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1", OMP_NUM_THREADS="2",
               HF_HUB_OFFLINE="1")
    # build from a copy of what a clone holds, so that the checkout gets no build/ or egg-info
    src = tmp / "src"
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          str(tmp / "dist"), str(src)], tmp, env)
    wheel, = (tmp / "dist").glob("mal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n[len("mal/configs/"):-len(".yaml")] for n in names if n.startswith("mal/configs/")) == \
        shipped_configs() and "mal/py.typed" in names
    venv = tmp / "venv"
    try:
        _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp, env)
    except AssertionError as e:
        pytest.skip(f"cannot create a virtual environment here: {str(e)[:300]}")
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    # the system's pip, run by the venv's interpreter, installs into the venv; --ignore-installed: an editable mal
    # in the system site (a development install) stays where it is
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)], tmp, env)
    work = tmp / "elsewhere"
    work.mkdir()
    return python, bindir, env, work


def test_wheel_installs_and_runs_outside_the_checkout(installed):
    python, bindir, env, work = installed
    where = _run([str(python), "-c", "import mal, mal.config as c; print(mal.__file__); print(c.SHIPPED_CONFIGS)"],
                 work, env).split()
    assert all(Path(p).is_relative_to(python.parent.parent) for p in where), where   # the wheel's copy, not src/
    mal = str(bindir / "mal")
    assert re.fullmatch(r"mal \d+\.\d+\.\d+\S*\n", _run([mal, "--version"], work, env))
    assert "--output" in _run([mal, "demo", "--help"], work, env)
    assert "mal_base_pretrain" in _run([mal, "config", "list"], work, env)
    _run([mal, "pretrain", "max_steps=2", "optim.batch_size=32", "probe=false", "model.dim=32", "model.depth=2",
          "objective.decoder.depth=1", "--config", "demo_pretrain", "--output", "runs/pre", "--no-progress"], work, env)
    assert (work / "runs/pre/ckpt_last/model.safetensors").is_file() and (work / "runs/pre/summary.json").is_file()
