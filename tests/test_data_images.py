"""mal.data's decoding of every Pillow mode to 8-bit RGB, and the pretrain / fine-tune / eval transforms."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from test_data_folder import rgb_array, solid

from mal.data import (ImageFolderDataset, eval_transform, finetune_transform, normalize_uint8, pretrain_transform,
                      to_rgb8)


def test_mode_conversion_values() -> None:
    s = (4, 4)
    grey = to_rgb8(Image.new("L", s, 128))
    assert (rgb_array(grey) == 128).all()

    onebit = to_rgb8(Image.new("1", s, 1))
    assert (rgb_array(onebit) == 255).all()

    rgba = Image.new("RGBA", s, (200, 10, 20, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent → white background
    out = rgb_array(to_rgb8(rgba))
    assert tuple(out[1, 1]) == (200, 10, 20) and tuple(out[0, 0]) == (255, 255, 255)
    half = rgb_array(to_rgb8(Image.new("RGBA", s, (0, 0, 0, 128))))  # half black on white
    assert abs(int(half[0, 0, 0]) - 127) <= 1

    la = rgb_array(to_rgb8(Image.new("LA", s, (50, 0))))
    assert (la == 255).all()

    cmyk = Image.new("CMYK", s, (0, 0, 0, 0))
    cmyk.putpixel((0, 0), (255, 0, 0, 0))  # pure cyan
    out = rgb_array(to_rgb8(cmyk))
    assert tuple(out[1, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 255, 255)

    pal = Image.new("P", s, 0)
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.putpixel((0, 0), 1)
    out = rgb_array(to_rgb8(pal))
    assert tuple(out[1, 1]) == (10, 20, 30) and tuple(out[0, 0]) == (40, 50, 60)
    pal.info["transparency"] = 1  # index 1 transparent → white
    out = rgb_array(to_rgb8(pal))
    assert tuple(out[1, 1]) == (10, 20, 30) and tuple(out[0, 0]) == (255, 255, 255)


def test_high_bit_depth_scaling() -> None:
    a16 = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)  # 32896 = 128*257
    for mode, arr in [("I;16", a16), ("I;16B", a16.astype(">u2"))]:
        img = Image.frombytes(mode, (2, 2), arr.tobytes())
        assert img.mode == mode
        out = rgb_array(to_rgb8(img))[..., 0]
        assert out.tolist() == [[0, 255], [128, 1]], mode  # scaled, not clipped at 255
    as_i = Image.fromarray(a16.astype(np.int32))
    assert as_i.mode == "I"
    assert rgb_array(to_rgb8(as_i))[..., 0].tolist() == [[0, 255], [128, 1]]

    f01 = Image.fromarray(np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32))
    assert f01.mode == "F"
    assert rgb_array(to_rgb8(f01))[..., 0].tolist() == [[0, 255], [128, 64]]
    fwide = Image.fromarray(np.array([[-1.0, 3.0], [1.0, 1.0]], dtype=np.float32))
    assert rgb_array(to_rgb8(fwide))[..., 0].tolist() == [[0, 255], [128, 128]]  # min-max


def test_mixed_modes_from_files(tmp_path: Path) -> None:
    """Every file comes out of the dataset as 3-channel uint8 with the right values."""
    d = tmp_path / "mixed" / "x"
    d.mkdir(parents=True)
    Image.new("L", (5, 5), 128).save(d / "a_grey.png")
    Image.fromarray(np.full((5, 5), 65535, dtype=np.uint16)).save(d / "b_16bit.png")
    Image.new("RGBA", (5, 5), (0, 0, 0, 0)).save(d / "c_rgba.png")
    Image.new("CMYK", (5, 5), (0, 255, 0, 0)).save(d / "d_cmyk.jpg", quality=100)
    pal = Image.new("P", (5, 5), 0)
    pal.putpalette([90, 80, 70] + [0] * 765)
    pal.save(d / "e_pal.gif")
    Image.new("1", (5, 5), 0).save(d / "f_1bit.bmp")
    Image.fromarray(np.full((5, 5), 0.5, dtype=np.float32)).save(d / "g_float.tif")

    with Image.open(d / "b_16bit.png") as raw:
        assert raw.mode.startswith("I")  # really stored as 16-bit
    ds = ImageFolderDataset(tmp_path / "mixed")
    got = {Path(p).stem: rgb_array(ds[i][0]) for i, (p, _) in enumerate(ds.samples)}
    assert ds.num_bad == 0
    assert (got["a_grey"] == 128).all()
    assert (got["b_16bit"] == 255).all()
    assert (got["c_rgba"] == 255).all()
    assert np.abs(got["d_cmyk"].astype(int) - [255, 0, 255]).max() <= 3  # magenta
    assert (got["e_pal"] == [90, 80, 70]).all()
    assert (got["f_1bit"] == 0).all()
    assert (got["g_float"] == 128).all()


# ---------------------------------------------------------------- transforms


def test_transforms_shapes_and_normalization() -> None:
    mean, std = (0.25, 0.5, 0.75), (0.1, 0.2, 0.3)
    img = solid(tuple(round(m * 255) for m in mean), side=32)  # the mean colour → ~0
    for tf in (
        finetune_transform(48, mean, std, re_prob=0.0),
        eval_transform(48, mean, std, crop_pct=1.0),
        eval_transform(48, mean, std),
    ):
        x = tf(img)
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    x = eval_transform(48, mean, std, crop_pct=1.0)(img)
    assert x.abs().max() < 0.05
    white = eval_transform(48, mean, std)(solid((255, 255, 255), side=32))
    expect = torch.tensor([(1 - m) / s for m, s in zip(mean, std)])
    assert torch.allclose(white.mean((1, 2)), expect, atol=1e-3)

    # crop_pct=1.0 on a square image is a plain bicubic resize (32 → 48)
    rng = np.random.default_rng(1)
    rand = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    plain = eval_transform(48, (0.0,) * 3, (1.0,) * 3, crop_pct=1.0)(rand)
    ref = torch.from_numpy(np.array(rand.resize((48, 48), Image.BICUBIC))).permute(2, 0, 1)
    assert torch.allclose(plain * 255, ref.float(), atol=1.0)
    # default crop_pct crops the centre of an upscaled image
    assert eval_transform(224, mean, std)(solid((0, 0, 0), 300)).shape == (3, 224, 224)


def test_pretraining_batches_are_uint8_and_normalize_on_the_device_as_totensor_normalize() -> None:
    """The pretraining transform stops at uint8; normalize_uint8 then gives what ToTensor + Normalize gave in the
    worker, to the bit (same crop from the same seed)."""
    from torchvision import transforms as T

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    torch.manual_seed(3)
    u8 = pretrain_transform(32, scale=(0.3, 1.0))(img)
    torch.manual_seed(3)
    ref = T.Compose([pretrain_transform(32, scale=(0.3, 1.0)), T.ToPILImage(), T.ToTensor(), T.Normalize(mean, std)])(img)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 32, 32)
    batch = torch.stack([u8, u8.flip(-1)])                                                  # (2, 3, 32, 32)
    got = normalize_uint8(batch, mean, std)
    assert got.dtype == torch.float32 and torch.equal(got[0], ref)
    assert torch.equal(got[1], ref.flip(-1))
    stats = [torch.tensor(v).view(3, 1, 1) for v in (mean, std)]          # as the trainer keeps them
    assert torch.equal(normalize_uint8(batch, *stats), got)


def test_finetune_transform_random_erasing() -> None:
    torch.manual_seed(0)
    tf = finetune_transform(32, (0.5,) * 3, (0.5,) * 3, re_prob=1.0, auto_augment=None)
    x = tf(solid((128, 128, 128), side=32))
    assert x.shape == (3, 32, 32)
    assert x.std() > 0.1  # erased pixel patch ≠ the flat grey image
