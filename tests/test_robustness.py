"""ImageNet-C robustness evaluation (mal.robustness, `mal eval --corruptions`): the corruptions, the cache of
corrupted arrays, the mCE arithmetic and the command end to end on a tiny CPU classifier. The tests that need
the optional package imagecorruptions-imaug (`pip install 'mal[robustness]'`) skip without it."""
import csv
import importlib.metadata
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mal.cli import main
from mal.robustness import cache, corruptions as C, report
from mal.robustness.metrics import summarize

HAS_BACKEND = importlib.util.find_spec("imagecorruptions") is not None
needs_backend = pytest.mark.skipif(not HAS_BACKEND,
                                   reason="needs imagecorruptions-imaug: pip install 'mal[robustness]'")


def _real_images(folder: Path, n: int) -> np.ndarray:
    """n test images of the fixture as uint8 (n, 32, 32, 3)."""
    files = sorted(folder.glob("test/*/*.jpg"))[:n]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32))) for f in files])


# ------------------------------------------------------------------ corruptions of one image
def test_severity_zero_is_the_identity():
    img = np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    for name in C.CORRUPTIONS:
        out = C.corrupt_image(img, name, 0, seed=7)
        assert out.dtype == np.uint8 and np.array_equal(out, img) and out is not img


@needs_backend
def test_each_corruption_changes_a_real_image_and_keeps_shape_and_dtype(image_folder):
    img = _real_images(image_folder, 1)[0]                                   # (32, 32, 3) uint8
    for name in C.CORRUPTIONS:
        for severity in (1, 5):
            out = C.corrupt_image(img, name, severity, seed=C.image_seed(0, name, severity))
            assert out.shape == img.shape and out.dtype == np.uint8, name
            assert (out != img).mean() > 0.01, (name, severity)
            again = C.corrupt_image(img, name, severity, seed=C.image_seed(0, name, severity))
            assert np.array_equal(out, again), f"{name} is not reproducible from its seed"


def test_names_and_severities_are_parsed_and_mistakes_named():
    assert C.parse_corruptions("all") == list(C.CORRUPTIONS)
    assert C.parse_corruptions("fog, gaussian_noise") == ["gaussian_noise", "fog"]     # benchmark order
    assert C.parse_corruptions("noise,contrast") == ["gaussian_noise", "shot_noise", "impulse_noise", "contrast"]
    with pytest.raises(ValueError, match=r"unknown corruption 'fogg' \(did you mean 'fog'\?\); valid: .*jpeg_comp"):
        C.parse_corruptions("gaussian_noise,fogg")
    assert C.parse_severities("1-5") == [1, 2, 3, 4, 5]
    assert C.parse_severities("5,1,3") == [1, 3, 5] and C.parse_severities("1-2,5") == [1, 2, 5]
    for bad in ("0-2", "6", "x", ""):
        with pytest.raises(ValueError, match="--severities"):
            C.parse_severities(bad)
    with pytest.raises(ValueError, match="at least 32x32"):
        C.corrupt_image(np.zeros((24, 24, 3), np.uint8), "fog", 1)
    with pytest.raises(ValueError, match="unknown corruption 'noise'"):
        C.corrupt_image(np.zeros((32, 32, 3), np.uint8), "noise", 1)


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(C.MissingExtraError, match=r"pip install 'mal\[robustness\]'"):
        C.backend_tag()


# ------------------------------------------------------------------ the cache
@pytest.fixture
def stub(monkeypatch):
    """A counting stand-in for imagecorruptions.corrupt (adds severity + a seeded draw), so the cache logic runs
    without the package."""
    calls = []

    def corrupt(image, corruption_name, severity, **kw):
        calls.append((corruption_name, severity))
        return (image + severity + np.random.randint(0, 3, image.shape)).astype(np.uint8)
    monkeypatch.setattr(C, "_corrupt_fn", lambda: corrupt)
    return calls


def _image_set(tmp_path, images, decoded):
    def decode():
        decoded.append(1)
        yield images[:3], np.arange(3)
        yield images[3:], np.arange(3, len(images))
    return cache.clean_set(tmp_path / "set-0123", decode, {"test": True}, images.shape)


def test_the_cache_is_reused_and_a_second_call_does_no_corruption_work(tmp_path, stub):
    images = np.random.default_rng(0).integers(0, 200, (5, 32, 32, 3), dtype=np.uint8)
    pairs = [("gaussian_noise", 1), ("fog", 2)]
    decoded = []
    first = _image_set(tmp_path, images, decoded)
    assert np.array_equal(first.images, images) and first.labels.tolist() == [0, 1, 2, 3, 4]
    np.random.seed(123)
    assert cache.ensure_corrupted(first, pairs, "stub-1", workers=0, progress=False) == 2
    assert np.random.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)   # caller's stream untouched
    assert len(stub) == 2 * 5
    made = {p: np.load(first.corrupted_path(*p, "stub-1")) for p in pairs}
    assert all(a.shape == images.shape and a.dtype == np.uint8 for a in made.values())

    stub.clear()
    second = _image_set(tmp_path, images, decoded)
    assert len(decoded) == 1                                                  # clean images decoded once
    assert cache.ensure_corrupted(second, pairs, "stub-1", workers=0, progress=False) == 0
    assert stub == []                                                         # no corruption work at all
    for p, a in made.items():
        assert np.array_equal(np.load(second.corrupted_path(*p, "stub-1")), a)
    assert cache.ensure_corrupted(second, [*pairs, ("fog", 3)], "stub-1", workers=0, progress=False) == 1
    assert stub == [("fog", 3)] * 5                                           # only the new pair is made
    assert not list(tmp_path.rglob("*.tmp*"))                                 # written atomically, nothing left


def test_the_fingerprint_follows_the_files_and_the_geometry(image_folder):
    from mal.data import build_dataset
    ds = build_dataset(image_folder, "test", None)
    name, key = cache.fingerprint(ds, "Resize(48)")
    assert name == "cifar10-test" and cache.fingerprint(ds, "Resize(48)") == (name, key)
    assert cache.fingerprint(ds, "Resize(64)")[1] != key


@needs_backend
def test_worker_processes_make_the_same_pixels_as_one_process(tmp_path, image_folder):
    images = _real_images(image_folder, 6)
    a = cache.clean_set(tmp_path / "a", lambda: iter([(images, np.zeros(6))]), {}, images.shape)
    b = cache.clean_set(tmp_path / "b", lambda: iter([(images, np.zeros(6))]), {}, images.shape)
    pairs = [("gaussian_noise", 2), ("frost", 1)]
    cache.ensure_corrupted(a, pairs, "real", workers=0, progress=False)
    cache.ensure_corrupted(b, pairs, "real", workers=2, progress=False)
    for p in pairs:
        assert np.array_equal(np.load(a.corrupted_path(*p, "real")), np.load(b.corrupted_path(*p, "real"))), p


# ------------------------------------------------------------------ mCE
def _table(top1: dict[str, list[float]]):
    return {c: {s + 1: {"top1": v} for s, v in enumerate(vals)} for c, vals in top1.items()}


def test_mce_and_relative_mce_match_a_hand_computation():
    model = _table({"fog": [80.0, 60.0], "snow": [70.0, 50.0]})              # errors 20, 40 | 30, 50; clean 10
    base = _table({"fog": [70.0, 50.0], "snow": [60.0, 40.0]})               # errors 30, 50 | 40, 60; clean 15
    out = summarize(model, 90.0, base, 85.0)
    # CE: fog (20+40)/(30+50) = 75 %, snow (30+50)/(40+60) = 80 %, mCE 77.5 %
    assert out["per_corruption"]["fog"]["ce"] == pytest.approx(75.0)
    assert out["per_corruption"]["snow"]["ce"] == pytest.approx(80.0)
    assert out["mce"] == pytest.approx(77.5)
    # relative: fog (10+30)/(15+35) = 80 %, snow (20+40)/(25+45) = 85.714 %, mean 82.857 %
    assert out["per_corruption"]["snow"]["relative_ce"] == pytest.approx(600 / 7)
    assert out["relative_mce"] == pytest.approx((80 + 600 / 7) / 2)
    assert out["mean_corruption_top1"] == pytest.approx(65.0) and out["mean_corruption_error"] == pytest.approx(35.0)
    assert out["per_corruption"]["fog"]["top1"] == pytest.approx(70.0)
    assert summarize(model, 90.0)["mce"] is None                              # no baseline, no CE


def test_an_undefined_ratio_is_reported_as_none_not_as_a_number():
    model = _table({"fog": [80.0], "snow": [70.0]})
    base = _table({"fog": [100.0], "snow": [60.0]})                           # baseline error 0 on fog
    out = summarize(model, 90.0, base, 100.0)
    assert out["per_corruption"]["fog"]["ce"] is None and out["mce"] is None
    assert out["per_corruption"]["snow"]["ce"] == pytest.approx(75.0)


def test_a_baseline_must_cover_the_same_corruptions_and_severities(tmp_path):
    doc = {"corruptions": ["fog"], "severities": [1, 2], "clean": {"top1": 90.0},
           "results": {"fog": {"1": {"top1": 70.0}, "2": {"top1": 60.0}}}}
    (tmp_path / "robustness").mkdir()
    (tmp_path / "robustness/robustness.json").write_text(json.dumps(doc))
    _, table, clean = report.load_baseline(tmp_path, ["fog"], [1, 2])         # a run folder is enough
    assert table == {"fog": {1: {"top1": 70.0}, 2: {"top1": 60.0}}} and clean == 90.0
    with pytest.raises(ValueError, match="no results for 3 of the corruption/severity pairs.*same --corruptions"):
        report.load_baseline(tmp_path, ["fog", "snow"], [2, 3])
    with pytest.raises(FileNotFoundError, match="evaluate the baseline first"):
        report.load_baseline(tmp_path / "nothing", ["fog"], [1])


# ------------------------------------------------------------------ the command, end to end
@pytest.fixture(scope="module")
def tiny_classifiers(image_folder, tmp_path_factory):
    """A tiny classifier trained for 2 steps on CPU, and a baseline: a copy with its head drawn anew."""
    import shutil
    import torch
    from safetensors.torch import load_file, save_file
    runs = tmp_path_factory.mktemp("runs")
    model, base = runs / "model", runs / "base"
    assert main(["supervised", "--config", "cifar10_supervised", "--output", str(model),
                 "--no-progress", f"data.dataset={image_folder}", "optim.batch_size=16", "max_steps=2",
                 "model.dim=32", "model.depth=2", "data.num_workers=0", "data.cache=false"]) == 0
    shutil.copytree(model / "ckpt_last", base / "ckpt_last")
    weights = load_file(str(base / "ckpt_last/model.safetensors"))
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v.shape, generator=g) if k.startswith("head.") else v for k, v in weights.items()}
    save_file(weights, str(base / "ckpt_last/model.safetensors"))
    return model, base


@pytest.fixture
def any_backend(request, monkeypatch):
    """The real package when installed, else the counting stub (so the command is tested everywhere)."""
    if not HAS_BACKEND:
        request.getfixturevalue("stub")
        monkeypatch.setattr(C, "backend_tag", lambda: "stub-1")


def test_mal_eval_corruptions_writes_json_csv_png_and_mce(tiny_classifiers, tmp_path, monkeypatch, capsys,
                                                          any_backend):
    model, base = tiny_classifiers
    args = ["--corruptions", "gaussian_noise,fog", "--severities", "1-2", "--cache-dir", str(tmp_path / "cache"),
            "--workers", "0", "data.num_workers=0"]
    assert main(["eval", "--checkpoint", str(base / "ckpt_last"), *args]) == 0
    assert (base / "robustness/robustness.json").is_file()

    made = []

    def no_work(*a):
        made.append(a)
        raise AssertionError("the cached corrupted images were made again")
    monkeypatch.setattr(cache, "corrupt_chunk", no_work)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(model / "ckpt_last"), *args, "--baseline", str(base)]) == 0
    assert made == []                                                         # the second model reuses the cache
    printed = json.loads(capsys.readouterr().out)
    doc = json.loads((model / "robustness/robustness.json").read_text())
    assert printed["mce"] == doc["mce"] and printed["robustness"]["png"] == str(model / "robustness/robustness.png")
    assert doc["corruptions"] == ["gaussian_noise", "fog"] and doc["severities"] == [1, 2]
    assert doc["num_images"] == 48 and set(doc["results"]["fog"]) == {"1", "2"}
    b = json.loads((base / "robustness/robustness.json").read_text())
    e = lambda d, c: [100 - d["results"][c][s]["top1"] for s in ("1", "2")]
    ces = [100 * sum(e(doc, c)) / sum(e(b, c)) for c in doc["corruptions"]]
    assert doc["mce"] == pytest.approx(sum(ces) / 2)
    rows = list(csv.DictReader(open(model / "robustness/robustness.csv")))
    assert len(rows) == 1 + 2 * (2 + 1) and rows[0]["corruption"] == "clean"
    assert (model / "robustness/robustness.png").stat().st_size > 1000

    assert main(["eval", "--checkpoint", str(model / "ckpt_last"), "--json", str(tmp_path / "plain.json"),
                 "data.num_workers=0"]) == 0
    assert json.loads((tmp_path / "plain.json").read_text())["top1"] == pytest.approx(doc["clean"]["top1"])


def test_mal_eval_corruptions_mistakes_are_named_before_any_work(tiny_classifiers, tmp_path, capsys):
    ckpt = str(tiny_classifiers[0] / "ckpt_last")
    for extra, words in ((["--corruptions", "fogg"], "did you mean 'fog'"),
                         (["--corruptions", "fog", "--severities", "0-9"], "severities are 1..5"),
                         (["--severities", "1-2"], "only apply with --corruptions"),
                         (["--corruptions", "fog", "model.img_size=16", "model.cluster_size=2"], "at least 32x32"),
                         (["--corruptions", "fog", "--baseline", str(tmp_path)],
                          "evaluate the baseline first" if HAS_BACKEND else "pip install 'mal[robustness]'")):
        assert main(["eval", "--checkpoint", ckpt, "--out", str(tmp_path / "r"), *extra]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
