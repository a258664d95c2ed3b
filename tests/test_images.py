"""The image loader and probe: every colour mode and orientation comes out as upright RGB."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from loraforge.dataset.images import load_image, probe_image, sniff_bytes
from loraforge.errors import ForgeError


def _split_jpeg(path: Path, orientation: int) -> None:
    """40x20 stored: left half red, right half blue; EXIF orientation as given."""
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, format="JPEG", quality=95, exif=exif)


def _near(pixel: tuple[int, ...], expected: tuple[int, int, int], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def test_exif_rotated_jpeg_comes_out_upright(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    _split_jpeg(path, 6)  # "rotate 90 CW to display": stored left column becomes the top row
    im = load_image(path)
    assert im.mode == "RGB"
    assert im.size == (20, 40)
    assert _near(im.getpixel((10, 5)), (255, 0, 0))
    assert _near(im.getpixel((10, 35)), (0, 0, 255))
    assert probe_image(path) == (20, 40)


def test_unrotated_jpeg_keeps_its_size(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    _split_jpeg(path, 1)
    assert probe_image(path) == (40, 20)
    assert load_image(path).size == (40, 20)


def test_transparent_rgba_pixel_becomes_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))
    im.putpixel((1, 0), (0, 0, 0, 128))
    im.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert _near(out.getpixel((1, 0)), (127, 127, 127), 2)
    assert out.getpixel((4, 4)) == (255, 0, 0)


def test_la_and_palette_with_transparency_become_rgb_on_white(tmp_path: Path) -> None:
    la = Image.new("LA", (4, 4), (50, 255))
    la.putpixel((0, 0), (0, 0))
    la.save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (50, 50, 50)

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * (254 * 3))
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((2, 2)) == (0, 200, 0)


def test_palette_without_transparency(tmp_path: Path) -> None:
    Image.new("RGB", (6, 6), (10, 120, 200)).convert("P").save(tmp_path / "p.bmp")
    out = load_image(tmp_path / "p.bmp")
    assert out.mode == "RGB"
    assert _near(out.getpixel((3, 3)), (10, 120, 200), 20)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    out = load_image(tmp_path / "c.jpg")
    assert out.mode == "RGB"
    assert _near(out.getpixel((8, 8)), (255, 0, 0), 20)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    im = Image.new("I;16", (4, 4), 0)
    im.putpixel((0, 0), 65535)
    im.putpixel((1, 0), 32896)  # 128 * 257
    im.putpixel((2, 0), 1024)   # 4 in 8 bits: clipping would make it white
    im.save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_image(tmp_path / "g16.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (128, 128, 128)
    assert out.getpixel((2, 0)) == (4, 4, 4)
    assert out.getpixel((3, 3)) == (0, 0, 0)


def test_32_bit_integer_image_becomes_rgb(tmp_path: Path) -> None:
    im = Image.new("I", (4, 4), 65535)
    im.putpixel((0, 0), 0)
    im.save(tmp_path / "i.tif")
    out = load_image(tmp_path / "i.tif")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert out.getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("mode, value, expected", [("L", 77, (77, 77, 77)),
                                                   ("1", 1, (255, 255, 255))])
def test_grayscale_and_bilevel_become_rgb(tmp_path: Path, mode: str, value: int,
                                          expected: tuple[int, int, int]) -> None:
    Image.new(mode, (5, 5), value).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.mode == "RGB"
    assert out.getpixel((2, 2)) == expected


def test_webp_and_mixed_case_extensions_load(tmp_path: Path) -> None:
    for name, fmt in (("a.PNG", "PNG"), ("b.JpEg", "JPEG"), ("c.WebP", "WEBP"), ("d.Bmp", "BMP")):
        Image.new("RGB", (30, 20), (0, 128, 0)).save(tmp_path / name, format=fmt)
        assert probe_image(tmp_path / name) == (30, 20)
        assert load_image(tmp_path / name).size == (30, 20)


def test_a_real_image_is_accepted_whatever_its_extension(tmp_path: Path) -> None:
    Image.new("RGB", (12, 10), (200, 10, 10)).save(tmp_path / "jpeg_inside.png", format="JPEG")
    assert probe_image(tmp_path / "jpeg_inside.png") == (12, 10)
    assert _near(load_image(tmp_path / "jpeg_inside.png").getpixel((6, 5)), (200, 10, 10), 20)


def test_load_image_is_fully_decoded(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    im = load_image(path)
    path.unlink()  # no lazy reads left: the pixels are in memory
    assert im.getpixel((0, 0)) == (1, 2, 3)


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((128, 128), 50).convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp")])
def test_truncated_images_are_reported(tmp_path: Path, fmt: str, suffix: str) -> None:
    data = _encoded(fmt)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) * 2 // 3])
    for reader in (probe_image, load_image):
        with pytest.raises(ForgeError) as info:
            reader(path)
        assert info.value.path == path
        assert "corrupt" in info.value.message or "truncated" in info.value.message
        assert info.value.fix


def test_jpeg_missing_its_last_bytes_is_truncated(tmp_path: Path) -> None:
    data = _encoded("JPEG")
    (tmp_path / "a.jpg").write_bytes(data[:-10])
    with pytest.raises(ForgeError, match="truncated"):
        probe_image(tmp_path / "a.jpg")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ForgeError) as info:
        load_image(tmp_path / "a.png")
    assert info.value.message == "is empty (0 bytes)"
    assert "copy it again" in (info.value.fix or "")


@pytest.mark.parametrize("data, kind", [
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "a PDF document"),
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00", "a ZIP archive"),
    (b"<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>", "an HTML page"),
    (b"just some notes, not an image\n", "text"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "a HEIC image"),
])
def test_not_an_image_names_its_real_type(tmp_path: Path, data: bytes, kind: str) -> None:
    assert sniff_bytes(data) == kind
    path = tmp_path / "x.png"
    path.write_bytes(data)
    with pytest.raises(ForgeError) as info:
        probe_image(path)
    assert kind in info.value.message
    assert info.value.fix


def test_png_header_with_garbage_is_corrupt(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ForgeError, match="corrupt"):
        probe_image(tmp_path / "x.png")


def test_gif_is_an_image_even_named_png(tmp_path: Path) -> None:
    Image.new("P", (9, 7), 3).save(tmp_path / "g.png", format="GIF")
    assert probe_image(tmp_path / "g.png") == (9, 7)
    assert load_image(tmp_path / "g.png").mode == "RGB"


def test_an_animation_is_refused_whatever_its_name_but_a_camera_mpo_is_a_picture(
        tmp_path: Path) -> None:
    """Training would see an animation's first frame only: the user is told, not surprised.
    A camera's JPEG that carries a second picture (MPO: stereo or preview) is one picture."""
    frames = [Image.new("RGB", (16, 12), (40 * i, 0, 0)) for i in range(3)]
    for name, fmt in (("moving.gif", "GIF"), ("moving.png", "GIF"), ("moving.webp", "WEBP"),
                      ("apng.png", "PNG"), ("pages.png", "TIFF")):
        frames[0].save(tmp_path / name, format=fmt, save_all=True, append_images=frames[1:])
        with pytest.raises(ForgeError, match="holds 3 frames") as refused:
            probe_image(tmp_path / name)
        assert refused.value.path == tmp_path / name
        assert "save the frame you want as a PNG" in (refused.value.fix or "")
    frames[0].save(tmp_path / "camera.jpg", format="MPO", save_all=True,
                   append_images=frames[1:2])
    assert Image.open(tmp_path / "camera.jpg").n_frames == 2
    assert probe_image(tmp_path / "camera.jpg") == (16, 12)
    frames[0].save(tmp_path / "still.png", format="GIF")  # one frame: a picture
    assert probe_image(tmp_path / "still.png") == (16, 12)


def test_a_picture_of_over_89_megapixels_raises_no_anonymous_library_warning(
        tmp_path: Path) -> None:
    """Pillow warns about 89-179 MP pictures without naming the file: that warning stays out
    of our output (a 10000 x 9000 picture, 90 MP, as one flat colour)."""
    import warnings

    path = tmp_path / "big.png"
    Image.new("L", (10000, 9000), 128).save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picture = load_image(path, fit=(100, 100))
    assert picture.size == (10000, 9000)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
