"""Shared fixtures: a small real-image ImageFolder (CIFAR-10 JPEGs from ../shared/data when present), the
`needs_gpu` marker of the kernel tests and the runner of their checks in Triton's CPU interpreter."""
import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO.parent / "shared/data/cifar10-jpeg.tar.gz"
SUBSET_CLASSES = ("airplane", "automobile", "frog")
INTERPRETER_MIN_TRITON = (3, 8)   # older interpreters cannot loop to bounds computed from program_id
HAS_TRITON = importlib.util.find_spec("triton") is not None


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


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_gpu: needs CUDA and triton (the Triton kernels on the GPU)")


def pytest_runtest_setup(item):
    """Skip a test marked `needs_gpu` where CUDA or triton is missing."""
    if item.get_closest_marker("needs_gpu") is not None:
        import torch
        if not (torch.cuda.is_available() and HAS_TRITON):
            pytest.skip("needs CUDA and triton")


@pytest.fixture
def triton_interpreter():
    """A runner of one check of `tests/interpreter/` under Triton's CPU interpreter: run(module, function) calls
    interpreter.<module>.<function>() in a subprocess with TRITON_INTERPRET=1 (src/ and tests/ on the path), which
    must print "ok"; skips without triton, or with one whose interpreter is too old for our kernels."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    import triton
    version = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit())
    if version < INTERPRETER_MIN_TRITON:
        pytest.skip(f"Triton's interpreter needs triton >= {INTERPRETER_MIN_TRITON} for these kernels")

    def run(module: str, function: str) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-m", "interpreter", module, function], env=env, capture_output=True,
                              text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    return run
