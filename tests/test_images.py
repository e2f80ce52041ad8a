"""Decoding: every kind of bad file becomes an ItemError; every odd mode becomes RGB the cv2 way."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from teranprep.errors import ItemError
from teranprep.pipeline.common.images import decode_image, discover_images


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind, payload):
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def _flip_idat_crc(png):
    at = png.index(b"IDAT")
    length = struct.unpack(">I", png[at - 4:at])[0]
    crc_at = at + 4 + length
    return png[:crc_at] + bytes([png[crc_at] ^ 0xFF]) + png[crc_at + 1:]


def test_png_with_bad_idat_crc_is_an_error_not_a_crash():
    png = _png_bytes(Image.new("RGB", (16, 16), (10, 200, 30)))
    decode_image(png)  # the intact file decodes
    with pytest.raises(ItemError, match="corrupt"):
        decode_image(_flip_idat_crc(png))


def test_decompression_bomb_is_refused_before_decoding():
    # A PNG header claiming 30000 x 30000 pixels (900 Mpx) with a tiny body.
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 100)) \
        + _chunk(b"IEND", b"")
    with pytest.raises(ItemError, match=r"image too large \(30000 x 30000, limit 89 megapixels; --max-megapixels to raise\)"):
        decode_image(png)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"hello, I am a text file pretending to be a jpeg\n" * 3, "not an image"),
])
def test_empty_and_non_image_files(data, reason):
    with pytest.raises(ItemError, match=reason):
        decode_image(data)


def test_truncated_jpeg_is_an_error():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    with pytest.raises(ItemError, match="corrupt"):
        decode_image(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(buf.getvalue())
    assert out.shape == (40, 20, 3)
    assert out[5, 10, 0] > 200 and out[35, 10, 0] < 60  # red now on top


def test_modes_become_rgb_like_opencv():
    gray = decode_image(_png_bytes(Image.fromarray(np.full((4, 5), 77, np.uint8))))
    assert gray.shape == (4, 5, 3) and (gray == 77).all()
    pal = Image.new("P", (3, 3))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    out = decode_image(_png_bytes(pal))
    assert tuple(out[1, 1]) == (10, 20, 30) and tuple(out[0, 0]) == (0, 0, 0)
    rgba = Image.new("RGBA", (2, 2), (50, 60, 70, 0))  # fully transparent: colour kept, alpha dropped
    assert tuple(decode_image(_png_bytes(rgba))[0, 0]) == (50, 60, 70)
    sixteen = Image.fromarray(np.full((3, 3), 0x1234, np.uint16))
    assert sixteen.mode.startswith("I")
    assert (decode_image(_png_bytes(sixteen)) == 0x12).all()  # high byte, as cv2 does
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=100)
    r, g, b = decode_image(buf.getvalue())[0, 0]
    assert r > 200 and g < 60 and b < 60


def test_discovery_keys_are_relative_posix_sorted_and_case_insensitive(tmp_path):
    for rel in ["b/x.JPG", "a.png", "a.jpg", "c.tiff", "notes.txt", ".hidden.jpg", "d/e/f.WebP", "g.bmp"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    keys = [e.key for e in discover_images(tmp_path)]
    assert keys == ["a.jpg", "a.png", "b/x.JPG", "c.tiff", "d/e/f.WebP", "g.bmp"]
    assert [e.key for e in discover_images(tmp_path, limit=2)] == ["a.jpg", "a.png"]
