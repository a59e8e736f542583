"""siclip.images: every image that enters siclip decodes to RGB as stage 1 (img2dataset) decodes it,
alpha composited onto white, whatever its mode; an unreadable one is one clear error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from siclip.images import IMAGE_EXTS, UnreadableImage, decode_image, image_member, is_image_file


def encoded(img, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def pixels(data) -> list:
    return np.asarray(decode_image(data)).tolist()


def palette(indices, transparency):
    img = Image.new("P", (len(indices), 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    img.putdata(indices)
    return encoded(img, transparency=transparency)


WHITE, RED, PINK = [255, 255, 255], [255, 0, 0], [255, 127, 127]  # pink: red at alpha 128 over white

CASES = {
    # (a) per mode: the encoded image and the RGB pixels it decodes to
    "RGBA": (encoded(Image.fromarray(np.array([[[255, 0, 0, 255], [0, 0, 0, 0], [255, 0, 0, 128], [10, 20, 30, 0]]],
                                              np.uint8), "RGBA")), [[RED, WHITE, PINK, WHITE]]),
    "LA": (encoded(Image.fromarray(np.array([[[100, 255], [0, 0], [100, 128]]], np.uint8), "LA")),
           [[[100] * 3, WHITE, [177] * 3]]),  # 128/255 * 100 + 127 = 177.2
    "P, transparent index": (palette([0, 1, 2], transparency=1), [[RED, WHITE, [0, 0, 255]]]),
    "P, alpha per entry": (palette([0, 1, 2], transparency=bytes([128, 0, 255])), [[PINK, WHITE, [0, 0, 255]]]),
    "RGB, transparent colour": (encoded(Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8), "RGB"),
                                        transparency=(1, 2, 3)), [[WHITE, [4, 5, 6]]]),
    "L": (encoded(Image.fromarray(np.array([[0, 100, 255]], np.uint8), "L")), [[[0] * 3, [100] * 3, WHITE]]),
    # OpenCV (and so stage 1) ignores a grey PNG's transparency entry: the stored grey shows
    "L, transparent grey": (encoded(Image.fromarray(np.array([[0, 100]], np.uint8), "L"), transparency=100),
                            [[[0] * 3, [100] * 3]]),
    "I;16": (encoded(Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16))), [[[0] * 3, [100] * 3, WHITE]]),
    "I (32-bit)": (encoded(Image.fromarray(np.array([[0, 257 * 100, 70000]], np.int32), "I"), "TIFF"),
                   [[[0] * 3, [100] * 3, WHITE]]),
    "CMYK": (encoded(Image.new("CMYK", (2, 1), (0, 255, 255, 0)), "TIFF"), [[RED, RED]]),
    "RGBA WebP": (encoded(Image.fromarray(np.array([[[255, 0, 0, 255], [9, 9, 9, 0]]], np.uint8), "RGBA"), "WEBP",
                          lossless=True), [[RED, WHITE]]),
}


@pytest.mark.parametrize("mode", list(CASES))
def test_each_mode_decodes_to_rgb_with_alpha_composited_onto_white(mode):
    data, expected = CASES[mode]
    img = decode_image(data)
    assert img.mode == "RGB" and pixels(data) == expected


@pytest.mark.parametrize("mode", [m for m in CASES if m not in ("I;16", "I (32-bit)")])
def test_each_mode_decodes_to_the_pixels_stage_1_writes(mode):
    """img2dataset's own resizer (OpenCV decode, its white matte), without resizing and losslessly encoded,
    gives the same pixels; CMYK within OpenCV's rounding."""
    from img2dataset.resizer import Resizer

    data, _ = CASES[mode]
    resizer = Resizer(image_size=8, resize_mode="no", resize_only_if_bigger=False, encode_format="png",
                      encode_quality=1)
    out, *_, err = resizer(io.BytesIO(data))
    assert err is None
    stage1 = np.asarray(Image.open(io.BytesIO(out)).convert("RGB"), dtype=int)
    assert np.abs(np.asarray(decode_image(data), dtype=int) - stage1).max() <= (2 if mode == "CMYK" else 0)


def test_sixteen_bit_grey_keeps_its_range_where_stage_1_would_saturate_it():
    """Documented difference: a JPEG shard of a 16-bit grey PNG is white above 255/65535; the decode scales."""
    data = encoded(Image.fromarray(np.full((2, 2), 257 * 60, np.uint16)))
    assert pixels(data) == [[[60] * 3] * 2] * 2


def test_exif_orientation_is_not_applied_as_stage_1_does_not_apply_it():
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    data = encoded(Image.new("RGB", (4, 2), tuple(RED)), "JPEG", exif=exif)
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == (2, 4)  # what applying it would give
    assert decode_image(data).size == (4, 2)


def test_bytes_a_path_a_file_and_an_opened_image_decode_alike(tmp_path):
    data, expected = CASES["RGBA"]
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for source in (data, path, str(path), io.BytesIO(data), Image.open(io.BytesIO(data))):
        assert pixels(source) == expected


@pytest.mark.parametrize("data, says", [(b"not a picture\n", "UnidentifiedImageError"),
                                        (CASES["RGBA"][0][:60], "")])
def test_an_unreadable_image_is_one_error_naming_it(tmp_path, data, says):
    path = tmp_path / "cat.jpg"
    path.write_bytes(data)
    with pytest.raises(UnreadableImage, match=f"{path}: not a readable image \\({says}") as e:
        decode_image(path)
    assert e.value.source == str(path) and e.value.reason
    with pytest.raises(UnreadableImage, match="sample 7: not a readable image"):
        decode_image(data, name="sample 7")


def test_one_list_of_image_extensions_for_files_and_shard_members():
    assert IMAGE_EXTS[0] == "jpg"
    assert is_image_file("a/B.JPG") and is_image_file("x.webp") and not is_image_file("x.txt")
    assert image_member({"__key__": "k", "txt": b"", "png": b""}) == "png" and image_member({"txt": b""}) is None
