"""connectors.decode: images in every mode, EXIF, PDFs, page ranges and every kind of bad input."""

import hashlib
import io
import struct
import zlib

import numpy as np
import pypdfium2 as pdfium
import pytest
from PIL import Image

from connectors.decode import DecodeLimits, content_id, expand, parse_page_range, to_rgb


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def _noise(size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _one(source: str, data: bytes, **limits):
    pages = list(expand(source, data, limits=DecodeLimits(**limits)))
    assert len(pages) == 1
    return pages[0]


def _pdf(sizes: list[tuple[float, float]]) -> bytes:
    pdf = pdfium.PdfDocument.new()
    for w, h in sizes:
        pdf.new_page(w, h)
    b = io.BytesIO()
    pdf.save(b)
    pdf.close()
    return b.getvalue()


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new(mode, (7, 5))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (7, 5)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "I;16"])
def test_png_modes_round_trip(mode):
    page = _one("x.png", _png(Image.new(mode, (9, 4))))
    assert page.error is None and page.page is None
    assert page.image.mode == "RGB" and page.image.size == (9, 4)


def test_cmyk_jpeg_and_float_tiff():
    b = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(b, "JPEG")  # red in CMYK
    page = _one("c.jpg", b.getvalue())
    r, g, bl = page.image.getpixel((4, 4))
    assert page.image.mode == "RGB" and r > 200 and g < 60 and bl < 60
    b = io.BytesIO()
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(b, "TIFF")
    page = _one("f.tif", b.getvalue())
    assert page.image.getpixel((0, 0)) == (128, 128, 128)  # [0,1] floats are scaled, not clipped to black


def test_rgba_is_plain_convert_like_reference():
    img = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert _one("a.png", _png(img)).image.getpixel((0, 0)) == (10, 20, 30)  # no compositing on white


def test_16_bit_is_scaled_not_clipped():
    a = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    img = Image.fromarray(a)
    assert [to_rgb(img).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    img32 = Image.fromarray(a.astype(np.int32))
    assert [to_rgb(img32).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    page = _one("g16.png", _png(img))  # Pillow reads 16-bit grayscale PNG as I;16
    assert [page.image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    b = io.BytesIO()
    img.save(b, "JPEG", exif=exif)
    assert Image.open(io.BytesIO(b.getvalue())).size == (40, 20)
    page = _one("rot.jpg", b.getvalue())
    assert page.error is None and page.image.size == (20, 40)


def test_truncated_png_and_jpeg():
    png = _png(_noise())
    b = io.BytesIO()
    _noise().save(b, "JPEG", quality=95)
    for name, data in (("t.png", png), ("t.jpg", b.getvalue())):
        page = _one(f"s3://bucket/{name}", data[: len(data) // 2])
        assert page.image is None
        assert page.error.startswith(f"s3://bucket/{name}: ") and "truncated" in page.error


def test_zero_bytes_text_and_garbage():
    assert _one("/d/empty.png", b"").error == "/d/empty.png: file is empty (0 bytes)"
    assert "not an image or PDF" in _one("/d/notes.txt", b"hello world\n").error
    # A PNG signature with nothing after it claims to be a PNG: the reason says so.
    assert "corrupt or unsupported PNG image" in _one("/d/x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 3).error


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    page = _one("bomb.png", _png_header_only(50000, 50000))
    assert page.image is None and "bomb.png: image too large" in page.error
    # Below Pillow's own limit but above ours: our check fires on the header alone.
    page = _one("big.png", _png_header_only(3000, 3000), max_pixels=1_000_000)
    assert "9000000 pixels > max_pixels=1000000" in page.error


def test_pixel_limit_is_max_pixels_both_ways():
    """Pillow's own limit (178,956,970 pixels) neither refuses what max_pixels allows nor shows up in errors."""
    page = _one("bomb.png", _png_header_only(50000, 50000), max_pixels=40_000_000)
    assert page.error == "bomb.png: image too large (50000x50000 = 2500000000 pixels > max_pixels=40000000)"
    assert "178956970" not in page.error
    # 225 M pixels: over Pillow's limit, under ours. The header-only file then fails for its real reason.
    page = _one("big.png", _png_header_only(15000, 15000), max_pixels=300_000_000)
    assert "too large" not in page.error and "truncated" in page.error


def _tiff_with(mode: str, tag: int, value: int) -> bytes:
    """A valid little-endian TIFF from Pillow with one SHORT tag of its first IFD rewritten."""
    b = io.BytesIO()
    Image.new(mode, (8, 8)).save(b, "TIFF")
    t = bytearray(b.getvalue())
    ifd = struct.unpack("<I", t[4:8])[0]
    for i in range(struct.unpack("<H", t[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", t[entry:entry + 2])[0] == tag:
            t[entry + 8:entry + 10] = struct.pack("<H", value)
            return bytes(t)
    raise AssertionError(f"tag {tag} not written by Pillow")


def test_tiff_in_a_pixel_format_pillow_cannot_decode_says_so():
    page = _one("/scans/half.tif", _tiff_with("F", 258, 16))  # 16-bit float samples
    assert page.image is None and "not an image" not in page.error
    assert page.error.startswith("/scans/half.tif: TIFF pixel format not supported (16-bit floating point grayscale")
    page = _one("/scans/cmyk1.tif", _tiff_with("L", 262, 5))  # CMYK with one sample per pixel
    assert "TIFF pixel format not supported (8-bit unsigned integer CMYK, 1 sample(s) per pixel)" in page.error


def test_max_bytes():
    page = _one("x.png", _png(_noise()), max_bytes=100)
    assert "too big" in page.error and "max_bytes=100" in page.error


def test_content_id():
    data = b"abc"
    h = hashlib.sha256(data).hexdigest()[:32]
    assert content_id(data, None) == h + ":img"
    assert content_id(data, 3) == h + ":3"


# ---------------------------------------------------------------- PDFs


def test_multipage_pdf_rasterized_at_longest_side():
    data = _pdf([(612, 792), (792, 612), (300, 300)])
    pages = list(expand("doc.pdf", data, limits=DecodeLimits()))
    assert [p.page for p in pages] == [1, 2, 3]
    assert all(p.error is None and p.image.mode == "RGB" for p in pages)
    assert [max(p.image.size) for p in pages] == [1288, 1288, 1288]
    assert pages[0].image.size[0] < pages[0].image.size[1] and pages[1].image.size[0] > pages[1].image.size[1]
    small = list(expand("doc.pdf", data, limits=DecodeLimits(pdf_longest_side=200)))
    assert max(small[2].image.size) == 200


def test_pillow_pdf_content_is_rendered():
    b = io.BytesIO()
    Image.new("RGB", (100, 50), (255, 0, 0)).save(b, "PDF", save_all=True, append_images=[Image.new("RGB", (50, 100), (0, 0, 255))])
    pages = list(expand("p.pdf", b.getvalue(), limits=DecodeLimits(pdf_longest_side=100)))
    assert [p.image.size for p in pages] == [(100, 50), (50, 100)]
    r, g, b_ = pages[0].image.getpixel((50, 25))
    assert r > 240 and g < 15 and b_ < 15  # Pillow stores pages as JPEG: allow a little loss
    r, g, b_ = pages[1].image.getpixel((25, 50))
    assert r < 15 and g < 15 and b_ > 240


def test_page_ranges():
    data = _pdf([(100 + 10 * i, 200) for i in range(6)])
    pages = list(expand("d.pdf", data, limits=DecodeLimits(page_range="1-2,4,5-", pdf_longest_side=200)))
    assert [p.page for p in pages] == [1, 2, 4, 5, 6]
    assert [p.image.size[0] for p in pages] == [100, 110, 130, 140, 150]
    assert [p.page for p in expand("d.pdf", data, limits=DecodeLimits(page_range="3,3,9"))] == [3]
    none = list(expand("d.pdf", data, limits=DecodeLimits(page_range="10-12")))
    assert len(none) == 1 and "selects no page" in none[0].error
    assert parse_page_range("1-3,7") == [(1, 3), (7, 7)]
    for bad in ("0", "3-1", "a", "1-2-3", ""):
        with pytest.raises(ValueError):
            DecodeLimits(page_range=bad) if bad else parse_page_range(bad)


def test_max_pdf_pages():
    data = _pdf([(100, 100)] * 3)
    page = _one("s3://b/many.pdf", data, max_pdf_pages=2)
    assert page.error == "s3://b/many.pdf: PDF has too many pages (3 selected > max_pdf_pages=2)"
    assert len(list(expand("many.pdf", data, limits=DecodeLimits(max_pdf_pages=2, page_range="1-2")))) == 2


def test_truncated_pdf():
    data = _pdf([(100, 100)] * 2)
    page = _one("s3://b/x.pdf", data[: len(data) // 3])
    assert page.image is None and page.error.startswith("s3://b/x.pdf: ") and "PDF" in page.error


# How the encrypted PDF is made: no qpdf/pypdf here, so the test writes one by hand with the PDF
# Standard Security Handler, revision 2 (40-bit RC4, ISO 32000-1 §7.6.3, algorithms 2, 3 and 4).
# The user password is "secret"; the test proves the file is genuinely encrypted by opening it
# with that password in pdfium and finding the (encrypted) blue square of its content stream.
_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def _encrypted_pdf(user: bytes = b"secret", owner: bytes = b"owner") -> bytes:
    doc_id = hashlib.md5(b"pagemill").digest()
    p = -4
    o_val = _rc4(hashlib.md5((owner + _PAD)[:32]).digest()[:5], (user + _PAD)[:32])
    key = hashlib.md5((user + _PAD)[:32] + o_val + struct.pack("<i", p) + doc_id).digest()[:5]
    u_val = _rc4(key, _PAD)
    content = _rc4(hashlib.md5(key + struct.pack("<i", 4)[:3] + b"\0\0").digest()[:10], b"0 0 1 rg 0 0 100 100 re f")
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 100 100] /Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>" % (o_val.hex().encode(), u_val.hex().encode(), p),
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Encrypt 5 0 R /ID [<%s> <%s>] >>\n" % (
        len(objs) + 1, doc_id.hex().encode(), doc_id.hex().encode())
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def test_encrypted_pdf():
    data = _encrypted_pdf()
    opened = pdfium.PdfDocument(data, password="secret")  # the file is valid and really encrypted
    img = opened[0].render(scale=1).to_pil().convert("RGB")
    assert img.getpixel((50, 50)) == (0, 0, 255)
    opened.close()
    page = _one("s3://b/x.pdf", data)
    assert page.image is None and page.page is None
    assert page.error == "s3://b/x.pdf: PDF is encrypted (password required)"


def _pdf_without_pages_tree() -> bytes:
    """Well-formed syntax whose catalog has no /Pages: pdfium fails on it without setting its error code."""
    objs = [b"<< /Type /Catalog >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 100 100] >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 4\n0000000000 65535 f \n" + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size 4 /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def test_corrupt_pdf_is_not_called_encrypted_whatever_was_read_before():
    corrupt, encrypted = _pdf_without_pages_tree(), _encrypted_pdf()
    expected = "c.pdf: corrupt or truncated PDF (cannot be opened)"
    assert _one("c.pdf", corrupt).error == expected
    assert _one("e.pdf", encrypted).error == "e.pdf: PDF is encrypted (password required)"
    assert _one("c.pdf", corrupt).error == expected  # read right after an encrypted file, in the same process
    assert _one("e.pdf", encrypted).error == "e.pdf: PDF is encrypted (password required)"


def test_error_source_is_redacted():
    page = _one("https://u:hunter2@host/x.png", b"")
    assert "hunter2" not in page.error and "hunter2" not in page.source


def test_postscript_is_not_opened():
    # Pillow would hand EPS to Ghostscript; untrusted PostScript must never get that far.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert "not an image or PDF" in _one("x.eps", eps).error


def test_multiframe_gif_gives_first_frame():
    b = io.BytesIO()
    frames = [Image.new("P", (6, 4), i) for i in range(3)]
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    page = _one("anim.gif", b.getvalue())
    assert page.error is None and page.image.size == (6, 4) and page.image.mode == "RGB"


def test_accepts_memoryview_and_numpy_bytes():
    data = _png(Image.new("L", (3, 2)))
    assert _one("m.png", memoryview(data)).image.size == (3, 2)
    assert _one("n.png", np.bytes_(data)).image.size == (3, 2)


def test_long_pdf_reopened_between_pages_renders_every_page(monkeypatch):
    """The document is reopened every _REOPEN_EVERY rendered pages (bounds pdfium's caches); nothing changes."""
    import connectors.decode as decode

    monkeypatch.setattr(decode, "_REOPEN_EVERY", 3)
    sizes = [(100 + i, 200) for i in range(10)]
    done = {4, 5}
    pages = list(expand("long.pdf", _pdf(sizes), limits=DecodeLimits(pdf_longest_side=200), skip=done.__contains__))
    assert [p.page for p in pages] == list(range(1, 11))
    assert [p.page for p in pages if p.skipped] == [4, 5] and all(p.image is None for p in pages if p.skipped)
    assert [p.image.size[0] for p in pages if not p.skipped] == [100 + i for i in range(10) if i + 1 not in done]
