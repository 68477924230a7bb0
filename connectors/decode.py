"""Turn input bytes into RGB pages: one per image, one per selected PDF page.

`expand` never raises for bad data: a broken input becomes a `DecodedPage` with
`error` set, so the pipeline writes an error row instead of failing the batch.
Not thread-safe for PDFs (pdfium is not); Ray runs decoders in separate processes.
"""

import hashlib
import io
import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from connectors.record import Record
from connectors.redact import redact

_PAGE_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d*)\s*)?$")


def parse_page_range(spec: str) -> list[tuple[int, int | None]]:
    """'1-3,7,10-' -> [(1, 3), (7, 7), (10, None)]; 1-based, inclusive, None = to the end."""
    out: list[tuple[int, int | None]] = []
    for part in spec.split(","):
        m = _PAGE_RANGE.match(part)
        if not m:
            raise ValueError(f"invalid page range {spec!r}: expected e.g. '1-3,7' or '5-'")
        lo = int(m.group(1))
        hi = None if m.group(2) == "" else int(m.group(2) or lo)
        if lo < 1 or (hi is not None and hi < lo):
            raise ValueError(f"invalid page range {spec!r}: pages are 1-based and ranges ascending")
        out.append((lo, hi))
    return out


class DecodeLimits(BaseModel):
    model_config = ConfigDict(frozen=True)

    max_pixels: int = Field(default=Image.MAX_IMAGE_PIXELS or 89_478_485, gt=0)
    max_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    max_pdf_pages: int = Field(default=1000, gt=0)
    pdf_longest_side: int = Field(default=1288, gt=0)
    page_range: str | None = None
    # Pillow formats we open. EPS/PS (would run Ghostscript on untrusted data) and other exotic
    # plugins are left out on purpose.
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "JPEG2000", "AVIF", "PPM", "TGA", "ICO")

    @field_validator("page_range")
    @classmethod
    def _valid_range(cls, v: str | None) -> str | None:
        if v is not None and v.strip():
            parse_page_range(v)
            return v
        return None

    def selected_pages(self, n_pages: int) -> list[int]:
        """1-based page numbers of an n-page document selected by `page_range`, in order, no duplicates."""
        if self.page_range is None:
            return list(range(1, n_pages + 1))
        pages: dict[int, None] = {}
        for lo, hi in parse_page_range(self.page_range):
            for p in range(lo, min(n_pages, hi if hi is not None else n_pages) + 1):
                pages[p] = None
        return list(pages)


class DecodedPage(Record):
    """One work item; dict-like (`page["image"]`) for Ray batches."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: str
    page: int | None = None  # 1-based PDF page; None for images
    image: Any = None  # PIL.Image.Image in RGB, or None when error is set or the page was skipped
    error: str | None = None
    decode_ms: float = 0.0
    skipped: bool = False  # `skip` said so: not rendered


def content_id(data: bytes, page: int | None) -> str:
    """Stable row id: the same bytes give the same id wherever they are stored (resume across moves)."""
    return row_id(content_key(data), page)


def content_key(data: bytes) -> str:
    """The content part of every row id of `data` (hash once, then `row_id` per page)."""
    return hashlib.sha256(data).hexdigest()[:32]


def row_id(key: str, page: int | None) -> str:
    return key + ":" + (str(page) if page is not None else "img")


def is_pdf(data: bytes) -> bool:
    # The spec allows junk before the header; readers accept it within the first KiB.
    return b"%PDF-" in data[:1024]


def expand(source: str, data: bytes, *, limits: DecodeLimits | None = None,
           skip: Callable[[int], bool] | None = None) -> Iterator[DecodedPage]:
    """Yield the decoded pages of one input; bad data gives one page with `error` naming `source`.

    Pages are rendered one at a time as they are consumed. A PDF page for which `skip(number)` is true
    is yielded `skipped`, without rendering (resume renders only the pages it lacks).
    """
    limits = limits or DecodeLimits()
    name = redact(source)
    t0 = time.perf_counter()
    if not isinstance(data, bytes):
        data = bytes(data or b"")  # memoryview / numpy bytes from Ray blocks
    if not data:
        yield _error(name, "file is empty (0 bytes)", t0)
    elif len(data) > limits.max_bytes:
        yield _error(name, f"file is too big ({len(data)} bytes > max_bytes={limits.max_bytes})", t0)
    elif is_pdf(data):
        yield from _expand_pdf(name, data, limits, t0, skip)
    else:
        yield _decode_image(name, data, limits, t0)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _error(source: str, reason: str, t0: float, page: int | None = None) -> DecodedPage:
    return DecodedPage(source=source, page=page, error=redact(f"{source}: {reason}"), decode_ms=_ms(t0))


# ---------------------------------------------------------------- images


def _available(formats: tuple[str, ...]) -> tuple[str, ...]:
    """The configured formats this Pillow build can open (JPEG2000/AVIF depend on optional libraries)."""
    Image.init()
    return tuple(f for f in (f.upper() for f in formats) if f in Image.OPEN)


def _decode_image(source: str, data: bytes, limits: DecodeLimits, t0: float) -> DecodedPage:
    formats = _available(limits.image_formats)
    try:
        with _own_pixel_limit():
            img = Image.open(io.BytesIO(data), formats=formats)
            w, h = img.size  # from the header, before any pixel is decoded
            if w * h > limits.max_pixels:
                return _error(source, f"image too large ({w}x{h} = {w * h} pixels > max_pixels={limits.max_pixels})", t0)
            img.load()
    except UnidentifiedImageError:
        return _error(source, _unidentified(data, formats), t0)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncation as OSError("image file is truncated ...") and corrupt headers as SyntaxError.
        return _error(source, f"corrupt or truncated image: {e}", t0)
    try:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - broken EXIF must not lose an otherwise fine image
            pass
        rgb = to_rgb(img)
    except (OSError, ValueError) as e:
        return _error(source, f"cannot convert image (mode {img.mode}) to RGB: {e}", t0)
    return DecodedPage(source=source, page=None, image=rgb, decode_ms=_ms(t0))


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Switch off Pillow's own bomb limit while opening: `max_pixels` is checked on the header instead.

    Pillow's limit (2 x MAX_IMAGE_PIXELS) would otherwise refuse with its own number what the user allowed,
    and quote that number instead of `max_pixels`. Decoders run one per process, so the global is safe to flip.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _unidentified(data: bytes, formats: tuple[str, ...]) -> str:
    """Name the format a file claims (its magic bytes) and why Pillow refused it, or say it is no image."""
    for fmt in formats:
        factory, accept = Image.OPEN[fmt]
        if accept is None or not accept(data[:16]):
            continue
        try:
            factory(io.BytesIO(data), None).close()
        except Exception as e:  # noqa: BLE001 - the plugin's own reason is what we want to report
            reason = str(e) or type(e).__name__
            if fmt == "TIFF" and (layout := _tiff_layout(data)):
                return f"TIFF pixel format not supported ({layout}): {reason}"
            return f"corrupt or unsupported {fmt} image: {reason}"
    return "not an image or PDF (unrecognized format)"


_TIFF_SAMPLES = {1: "unsigned integer", 2: "signed integer", 3: "floating point"}
_TIFF_PHOTOMETRIC = {0: "min-is-white", 1: "grayscale", 2: "RGB", 3: "palette", 4: "mask", 5: "CMYK",
                     6: "YCbCr", 8: "CIELab"}


def _tiff_layout(data: bytes) -> str | None:
    """'16-bit floating point grayscale, 1 sample per pixel' from the first IFD, or None if unreadable."""
    from PIL import TiffImagePlugin

    try:
        ifd = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
        fp = io.BytesIO(data)
        fp.seek(ifd.next)
        ifd.load(fp)
        bits = ifd.get(258, (1,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        fmt = ifd.get(339, (1,))
        fmt = fmt[0] if isinstance(fmt, tuple) else fmt
        photometric = ifd.get(262)
        spp = ifd.get(277, 1)
    except Exception:  # noqa: BLE001 - a header we cannot parse has no layout to report
        return None
    bit_text = "/".join(str(b) for b in dict.fromkeys(bits))
    colour = _TIFF_PHOTOMETRIC.get(photometric, f"photometric {photometric}")
    return f"{bit_text}-bit {_TIFF_SAMPLES.get(fmt, f'sample format {fmt}')} {colour}, {spp} sample(s) per pixel"


def to_rgb(img: Image.Image) -> Image.Image:
    """`.convert("RGB")` like the reference model code, after scaling 16-bit/32-bit/float modes to 8 bits.

    Pillow's own I/F -> L conversion clips instead of scaling, which turns 16-bit scans white.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            a = a / 257.0
        else:
            lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
            if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
                a = a * 255.0  # normalized float image
            elif lo >= 0.0 and hi <= 255.0:
                pass  # already 8-bit range
            elif img.mode == "I" and lo >= 0.0 and hi <= 65535.0:
                a = a / 257.0  # 16-bit data widened to 32-bit (e.g. some PNG/TIFF decoders)
            else:
                a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        img = Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Palette images with Transparency ..." is expected
        return img.convert("RGB")


# ---------------------------------------------------------------- PDFs


# pdfium keeps every object it has parsed (page dictionaries, image streams) until the document closes:
# about 0.4 MB per rendered page of a scan. Reopening after this many rendered pages bounds that.
_REOPEN_EVERY = 50


def _open_pdf(data: bytes) -> pdfium.PdfDocument:
    pdf = pdfium.PdfDocument(data)
    pdf.init_forms()  # so filled-in form fields are rendered, as a viewer shows them
    return pdf


def _expand_pdf(source: str, data: bytes, limits: DecodeLimits, t0: float,
                skip: Callable[[int], bool] | None = None) -> Iterator[DecodedPage]:
    try:
        pdf = _open_pdf(data)
    except pdfium.PdfiumError as e:
        yield _error(source, _pdf_open_failure(data, getattr(e, "err_code", None)), t0)
        return
    try:
        n = len(pdf)
        if n == 0:
            yield _error(source, "PDF has no pages", t0)
            return
        pages = limits.selected_pages(n)
        if not pages:
            yield _error(source, f"page_range {limits.page_range!r} selects no page of this {n}-page PDF", t0)
            return
        if len(pages) > limits.max_pdf_pages:
            yield _error(
                source, f"PDF has too many pages ({len(pages)} selected > max_pdf_pages={limits.max_pdf_pages})", t0
            )
            return
        rendered = 0
        for number in pages:
            if skip is not None and skip(number):
                yield DecodedPage(source=source, page=number, skipped=True)
                continue
            if rendered and rendered % _REOPEN_EVERY == 0:
                pdf.close()
                pdf = _open_pdf(data)
            yield _render_page(source, pdf, number, limits, t0)
            rendered += 1
            t0 = time.perf_counter()  # opening the document is charged to the first rendered page
    finally:
        pdf.close()


# The trailer (or cross-reference stream dictionary) of an encrypted PDF names its encryption dictionary.
_ENCRYPT = re.compile(rb"/Encrypt\s*(?:\d+\s+\d+\s+R|<<)")


def _pdf_open_failure(data: bytes, err_code: int | None) -> str:
    """Why pdfium could not open `data`, from the file itself where pdfium's error code cannot be trusted.

    pdfium sometimes fails without setting its error code, and pypdfium2 then reports the code left by
    the previous failure in this process: a corrupt file read after an encrypted one would be "encrypted".
    So "encrypted" needs an encryption dictionary in the file.
    """
    encrypted = _ENCRYPT.search(data) is not None
    if encrypted and err_code == pdfium_c.FPDF_ERR_SECURITY:
        return "PDF uses an unsupported security handler"
    if encrypted:
        return "PDF is encrypted (password required)"
    return "corrupt or truncated PDF (cannot be opened)"


def _render_page(source: str, pdf: pdfium.PdfDocument, number: int, limits: DecodeLimits, t0: float) -> DecodedPage:
    page = None
    try:
        page = pdf[number - 1]
        w_pt, h_pt = page.get_size()
        if w_pt <= 0 or h_pt <= 0:
            return _error(source, f"page {number} has an empty page box", t0, page=number)
        scale = limits.pdf_longest_side / max(w_pt, h_pt)
        w_px, h_px = round(w_pt * scale), round(h_pt * scale)
        if w_px * h_px > limits.max_pixels:
            return _error(source, f"page {number} too large to render ({w_px}x{h_px} = {w_px * h_px} pixels > max_pixels={limits.max_pixels})", t0, page=number)
        bitmap = page.render(scale=scale)
        img = bitmap.to_pil().convert("RGB")
        bitmap.close()
        return DecodedPage(source=source, page=number, image=img, decode_ms=_ms(t0))
    except (pdfium.PdfiumError, OSError, ValueError) as e:
        return _error(source, f"page {number} cannot be rendered: {e}", t0, page=number)
    finally:
        if page is not None:
            page.close()
