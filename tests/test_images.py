"""Image reading and decoding: tar refs, bombs, truncation, mode normalisation, determinism."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline import images
from pipeline.images import (
    ImageRejected,
    cap_longest_side,
    decode_rgb,
    encode_jpeg,
    read_image_bytes,
    tar_ref,
)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w: int = 120, h: int = 80) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(ImageRejected) as err:
        decode_rgb(data, **kw)
    return err.value.reason


def test_plain_jpeg_decodes_to_rgb():
    img = decode_rgb(_encode(_photo(), "JPEG"))
    assert img.mode == "RGB" and img.size == (120, 80)


def test_truncated_jpeg_rejected_even_if_global_flag_was_flipped():
    data = _encode(_photo(), "JPEG")
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as a careless library might
    try:
        assert _reason(data[: len(data) // 2]) == images.TRUNCATED
        assert _reason(data[:300]) == images.TRUNCATED
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_empty_and_garbage_bytes():
    assert _reason(b"") == images.EMPTY
    assert _reason(b"not an image at all") == images.UNKNOWN_FORMAT


def test_bomb_rejected_from_header_before_decoding(monkeypatch):
    # PIL's own guard may be switched off (ultralytics does this); ours must not depend on it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    data = _encode(Image.new("1", (20000, 20000)), "PNG")
    assert len(data) < 100_000
    assert _reason(data) == images.TOO_MANY_PIXELS
    assert _reason(_encode(_photo(), "PNG"), max_pixels=100) == images.TOO_MANY_PIXELS


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = decode_rgb(_encode(rgba, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)
    la = Image.new("LA", (4, 4), (0, 0))
    assert decode_rgb(_encode(la, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] * 256)
    assert decode_rgb(_encode(pal, "PNG", transparency=0)).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_and_16bit_gray_normalised():
    cmyk = decode_rgb(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    r, g, b = cmyk.getpixel((4, 4))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60
    gray16 = Image.fromarray(np.full((6, 6), 40000, dtype=np.uint16))
    out = decode_rgb(_encode(gray16, "PNG"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (156, 156, 156)  # 40000 >> 8


def test_exif_orientation_applied():
    img = _photo(60, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    out = decode_rgb(_encode(img, "JPEG", exif=exif))
    assert out.size == (20, 60)


def test_read_plain_and_tar_refs(tmp_path):
    data = _encode(_photo(), "JPEG")
    (tmp_path / "a.jpg").write_bytes(data)
    assert read_image_bytes(str(tmp_path / "a.jpg")) == data
    with pytest.raises(ImageRejected) as err:
        read_image_bytes(str(tmp_path / "missing.jpg"))
    assert err.value.reason == images.MISSING

    tar_path = tmp_path / "x.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, payload in [("k1.jpg", data), ("../evil.jpg", data)]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert read_image_bytes(tar_ref(str(tar_path), "k1.jpg")) == data
    with pytest.raises(ImageRejected) as err:
        read_image_bytes(tar_ref(str(tar_path), "../evil.jpg"))
    assert err.value.reason == images.UNSAFE_MEMBER
    with pytest.raises(ImageRejected) as err:
        read_image_bytes(tar_ref(str(tar_path), "nope.jpg"))
    assert err.value.reason == images.MISSING


def test_cap_and_encode_are_deterministic():
    img = _photo(1000, 400)
    small = cap_longest_side(img, 256)
    assert small.size == (256, 102)
    assert cap_longest_side(small, 512) is small
    assert encode_jpeg(small) == encode_jpeg(cap_longest_side(_photo(1000, 400), 256))
    assert decode_rgb(encode_jpeg(small)).size == (256, 102)


def test_unknown_format_is_rejected_even_after_ultralytics_patched_pil():
    """ultralytics wraps Image.open to pip-install pi-heif on unknown files; decode must not."""
    import ultralytics.utils.patches  # noqa: F401  (applies the patch)

    from pipeline.images import ImageRejected, decode_rgb

    with pytest.raises(ImageRejected) as info:
        decode_rgb(b"definitely not an image, but not empty either")
    assert info.value.reason == "image: unknown format"
