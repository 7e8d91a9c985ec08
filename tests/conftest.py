"""Shared fixtures: a small real-image ImageFolder (CIFAR-10 JPEGs from ../shared/data when present)."""
import importlib.util
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO.parent / "shared/data/cifar10-jpeg.tar.gz"
SUBSET_CLASSES = ("airplane", "automobile", "frog")
INTERPRETER_MIN_TRITON = (3, 8)   # older interpreters cannot loop to bounds computed from program_id


def _extract_cifar(root: Path, per_class: dict[str, int]) -> None:
    want = {(split, c): n for split, n in per_class.items() for c in SUBSET_CLASSES}
    got = {k: 0 for k in want}
    with tarfile.open(CIFAR_TAR, "r:gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if len(parts) != 4 or not m.isfile():
                continue
            key = (parts[1], parts[2])
            if key in got and got[key] < want[key]:
                tf.extract(m, root, filter="data") if sys.version_info >= (3, 12) else tf.extract(m, root)
                got[key] += 1
            if all(got[k] >= want[k] for k in want):
                break


def _synthetic(root: Path, per_class: dict[str, int]) -> None:
    """Fallback when the shared data is absent: class = dominant colour, with noise."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for ci, c in enumerate(SUBSET_CLASSES):
            d = root / "cifar10" / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                img[..., ci] += 150
                Image.fromarray(img).save(d / f"{i:04d}.jpg")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """cifar10/{train,test}/<3 classes>/ with 64 train and 16 test images per class."""
    root = tmp_path_factory.mktemp("imgs")
    per_class = {"train": 64, "test": 16}
    if CIFAR_TAR.is_file():
        _extract_cifar(root, per_class)
    else:
        _synthetic(root, per_class)
    return root / "cifar10"


@pytest.fixture(autouse=True)
def _few_threads():
    """Keep CPU tests predictable on the 2-core CI machine."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, int(os.environ.get("MAL_TEST_THREADS", "2"))))
    yield
    torch.set_num_threads(n)


@pytest.fixture
def triton_interpreter():
    """A runner for a Python script under Triton's CPU interpreter (TRITON_INTERPRET=1, src/ on the path) that
    must print "ok"; skips without triton, or with one whose interpreter is too old for our kernels."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import triton
    version = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit())
    if version < INTERPRETER_MIN_TRITON:
        pytest.skip(f"Triton's interpreter needs triton >= {INTERPRETER_MIN_TRITON} for these kernels")

    def run(script: str) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    return run
