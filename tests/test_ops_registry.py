"""The ops' registry and dispatch (`mal.ops.registry`): auto picks the first candidate that supports the inputs
else the reference, named backends are checked, lazily named implementations are imported only for inputs on
their device, a backend whose dependency does not import is unavailable, and the dispatch traces in one graph.
"""
from __future__ import annotations

import pytest
import torch

from mal.ops.registry import Registry

LAZY = f"{__name__}:"                                            # this module, imported by name


def double(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


def small(x: torch.Tensor) -> bool:
    return x.numel() <= 4


def toy_registry() -> Registry:
    """A toy op: the reference x + x, a "fast" x * 2 for at most 4 elements (named lazily), one more only by
    name, one on CUDA and one whose implementation needs a package that is not installed."""
    reg = Registry()
    reg.register("toy", "torch", lambda x: x + x, reference=True)
    reg.register("toy", "fast", LAZY + "double", LAZY + "small")
    reg.register("toy", "named", double, auto=False)
    reg.register("toy", "gpu", LAZY + "double", device="cuda")
    reg.register("toy", "missing", "mal_no_such_dependency_xyz:f")
    return reg


def test_auto_picks_the_first_candidate_that_supports_the_inputs_else_the_reference():
    reg = toy_registry()
    assert reg.backends("toy") == ["torch", "fast", "named", "gpu", "missing"]
    assert reg.resolve("toy", torch.ones(3)).name == "fast"
    assert reg.resolve("toy", torch.ones(9)).name == "torch"            # fast refuses, gpu and missing cannot run
    assert reg.resolve("toy", torch.ones(9)).reference
    assert torch.equal(reg.resolve("toy", torch.ones(3))(torch.ones(3)), torch.full((3,), 2.0))


def test_named_backends_are_checked():
    reg = toy_registry()
    assert reg.resolve("toy", torch.ones(9), backend="named").name == "named"
    with pytest.raises(ValueError, match=r"unknown toy backend 'nope'; choose one of \['auto', 'torch', 'fast'"):
        reg.resolve("toy", torch.ones(3), backend="nope")
    with pytest.raises(ValueError, match="supports"):
        reg.resolve("toy", torch.ones(9), backend="fast")
    with pytest.raises(ValueError, match="runs on cuda inputs"):
        reg.resolve("toy", torch.ones(3), backend="gpu")
    with pytest.raises(ValueError, match="not available here .*mal_no_such_dependency_xyz"):
        reg.resolve("toy", torch.ones(3), backend="missing")
    with pytest.raises(ValueError, match="unknown op 'other'"):
        reg.resolve("other", torch.ones(3))
    with pytest.raises(ValueError, match="reference backend already"):
        reg.register("toy", "torch2", double, reference=True)


def test_a_wrong_module_name_of_the_package_itself_is_an_error_not_an_unavailable_backend():
    reg = Registry()
    reg.register("toy", "torch", double, reference=True)
    reg.register("toy", "typo", "mal.ops.no_such_module:f")
    with pytest.raises(ModuleNotFoundError):
        reg.resolve("toy", torch.ones(3))


def test_dispatch_traces_as_one_graph():
    """A lazily named predicate and implementation, once imported, resolve inside a torch.compile trace without
    a graph break (the fused block's compiled regions dispatch the headwise op this way)."""
    reg = toy_registry()
    reg.prepare("cpu")
    reg.resolve("toy", torch.ones(3))                                     # imports the lazy names
    fn = lambda x: reg.resolve("toy", x)(x)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    for n in (3, 9):
        assert torch.equal(compiled(torch.ones(n)), fn(torch.ones(n)))


def test_the_ops_backends_and_their_cpu_fallbacks():
    from mal.ops import backends, resolve
    assert backends("mlstm") == ["torch", "recurrent", "triton", "chunkwise"]
    for op in ("headwise", "qkv", "norm", "block_grad"):
        assert backends(op) == ["torch", "triton"], op
    q, i = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5)
    assert resolve("mlstm", q, q, q, i, i).name == "torch"
    xz, x = torch.randn(2, 5, 32, dtype=torch.bfloat16), torch.randn(2, 5, 16)
    conv_w, wq, b = torch.randn(16, 1, 4), torch.randn(4, 4, 4), torch.randn(16)
    assert resolve("headwise", xz[..., :16].reshape(-1, 16), xz[..., 16:].reshape(-1, 16), 4).reference
    assert resolve("qkv", xz, conv_w, wq, b, b, b, 4).reference
    assert resolve("norm", x, None, torch.bfloat16).reference
    assert resolve("block_grad", xz, 2, conv_w, wq, 4).reference
    with pytest.raises(ValueError, match=r"unknown mlstm backend 'foo'; choose one of "
                                         r"\['auto', 'torch', 'recurrent', 'triton', 'chunkwise'\]"):
        resolve("mlstm", q, q, q, i, i, backend="foo")
    with pytest.raises(ValueError, match="mlstm backend 'triton' does not support .* on cpu: it runs on cuda"):
        resolve("mlstm", q, q, q, i, i, backend="triton")


def cpu_model_without_triton() -> None:
    """Run in a subprocess as if triton were not installed: the plain and the fast (eager) model train on the
    CPU, the registry lists every backend, and no kernel module of `mal.ops` is imported. (Whether "triton" ends
    up in sys.modules is not ours to say: where triton is installed, timm's import of torch._dynamo imports it.)"""
    import sys
    assert sys.modules.get("triton", 0) is None, "run with sys.modules['triton'] = None"
    from mal import EncoderConfig, VisionLSTM
    from mal.ops import backends, resolve
    torch.manual_seed(0)
    model = VisionLSTM(EncoderConfig(img_size=16, patch_size=4, dim=16, depth=2, cluster_size=2), num_classes=3)
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    model.fast_path(compile=False)
    out = model(x)
    out.sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert backends("mlstm") == ["torch", "recurrent", "triton", "chunkwise"]
    q = torch.randn(1, 2, 5, 16)
    assert resolve("mlstm", q, q, q, q[..., 0], q[..., 0]).name == "torch"
    kernels = [m for m in sys.modules if m.startswith("mal.ops") and m.endswith(".kernel")]
    assert not kernels, kernels


def test_the_cpu_model_needs_no_triton_and_imports_no_kernel():
    import os
    import subprocess
    import sys
    from pathlib import Path
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent / "src"), str(tests),
                                                        os.environ.get("PYTHONPATH", "")]))
    code = "import sys; sys.modules['triton'] = None; import test_ops_registry as t; t.cpu_model_without_triton()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
