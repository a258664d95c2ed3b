"""Reading training images: one loader for the whole project, and a cheap probe for the check.

`load_image` returns a fully decoded RGB image whatever the file holds: EXIF orientation applied,
transparency composited on white, CMYK / 16-bit / grayscale / palette converted. `probe_image`
answers the (oriented) size and proves the file decodes, for `loraforge dataset check`.

A file is judged by its content, never by its extension: a JPEG saved as `.png` is an image; a PDF
saved as `.png` is not, and the error says it is a PDF. Every failure is a `ForgeError` naming
the file and the fix.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from loraforge.errors import ForgeError

#: Extensions a dataset image may have (compared lower-cased), as in the community pre-flight.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})

#: Decoders tried on a dataset image. Restricted on purpose: Pillow has loose plugins (TGA, ...)
#: that would "open" random bytes; these formats all have real magic numbers.
_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "DIB", "GIF", "TIFF", "AVIF")

#: Colour modes `to_rgb` converts; anything else is refused up front (probe and load agree).
_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                    "YCbCr", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

_ORIENTATION = 0x0112
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
_HEAD_BYTES = 512
_WHITE = (255, 255, 255, 255)

_FIX_CORRUPT = ("copy it again from the original (an interrupted copy or download leaves a "
                "truncated file), re-export it, or delete it")
_FIX_NOT_IMAGE = ("give a picture file here (PNG, JPEG or WebP); in a dataset folder, delete it or "
                  "move it out of the dataset folder")
_FIX_CONVERT = "convert it to PNG or JPEG (any image editor: Export/Save As), or delete it"


# --- what is this file, really? -------------------------------------------------------------

_IMAGE_KINDS = frozenset({"a PNG image", "a JPEG image", "a WebP image", "a BMP image",
                          "a GIF image", "a TIFF image", "a HEIC image", "an AVIF image",
                          "a JPEG 2000 image", "a JPEG XL image", "a Photoshop document",
                          "an SVG drawing"})

#: Image kinds whose usual extension is in IMAGE_EXTENSIONS (a rename is all it takes).
SUPPORTED_KIND_EXTENSION = {"a PNG image": ".png", "a JPEG image": ".jpg", "a WebP image": ".webp",
                            "a BMP image": ".bmp"}


def _ftyp_kind(brand: bytes) -> str:
    if brand in (b"heic", b"heix", b"heis", b"heim", b"hevc", b"mif1", b"msf1"):
        return "a HEIC image"
    if brand in (b"avif", b"avis"):
        return "an AVIF image"
    if brand.startswith(b"qt"):
        return "a QuickTime video"
    if brand.startswith(b"M4A"):
        return "an M4A audio file"
    return "an MP4 video"


def sniff_bytes(head: bytes) -> str | None:
    """What a file's first bytes say it is ("a PDF document", "a PNG image", "text"), or None."""
    if not head:
        return None
    simple = (
        (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
        (b"GIF87a", "a GIF image"), (b"GIF89a", "a GIF image"),
        (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
        (b"\x00\x00\x00\x0cjP  \r\n", "a JPEG 2000 image"),
        (b"\xff\x4f\xff\x51", "a JPEG 2000 image"),
        (b"\x00\x00\x00\x0cJXL ", "a JPEG XL image"), (b"\xff\x0a", "a JPEG XL image"),
        (b"8BPS", "a Photoshop document"), (b"%PDF", "a PDF document"),
        (b"PK\x03\x04", "a ZIP archive"), (b"PK\x05\x06", "a ZIP archive"),
        (b"\x1f\x8b", "a gzip archive"), (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
        (b"Rar!\x1a\x07", "a RAR archive"), (b"BZh", "a bzip2 archive"),
        (b"\xfd7zXZ\x00", "an xz archive"), (b"\x28\xb5\x2f\xfd", "a zstd archive"),
        (b"\x7fELF", "a program (ELF executable)"), (b"\x93NUMPY", "a NumPy array"),
        (b"OggS", "an Ogg media file"), (b"fLaC", "a FLAC audio file"), (b"ID3", "an MP3 file"),
        (b"\x1a\x45\xdf\xa3", "a Matroska/WebM video"),
        (b"SQLite format 3\x00", "a SQLite database"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Microsoft Office document"),
        (b"bplist00", "a macOS property list"),
    )
    for magic, kind in simple:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and len(head) >= 12:
        return {b"WEBP": "a WebP image", b"WAVE": "a WAV audio file",
                b"AVI ": "an AVI video"}.get(head[8:12], "a RIFF media file")
    if head[4:8] == b"ftyp":
        return _ftyp_kind(head[8:12])
    if head.startswith(b"BM") and len(head) >= 26 and head[6:10] == b"\x00\x00\x00\x00":
        return "a BMP image"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive"
    return _sniff_text(head)


def _sniff_text(head: bytes) -> str | None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 text"
    body = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the read: decode what came before it.
        if exc.start < len(body) - 4:
            return None
        text = body[:exc.start].decode("utf-8")
    if any(ord(c) < 32 and c not in "\t\r\n\f" for c in text):
        return None
    lowered = text.lstrip().lower()
    if lowered.startswith(("<!doctype html", "<html", "<head", "<body")):
        return "an HTML page"
    if lowered.startswith("<svg") or (lowered.startswith("<?xml") and "<svg" in lowered):
        return "an SVG drawing"
    if lowered.startswith("<?xml"):
        return "an XML document"
    if lowered.startswith("{"):
        return "JSON text"
    return "text"


#: The PNG text chunk (keyword, text) marking a pose map loraforge wrote (`pose extract`,
#: `random`, `render`): never a picture to train, and the one kind of PNG they replace.
POSE_MARK = ("loraforge", "pose map")


def png_texts(path: Path) -> dict[str, str]:
    """The PNG text chunks (tEXt) at `path` before its image data, read from the chunks (a few
    small reads, and a PNG too large for Pillow's guard is still read); {} for any other
    file."""
    texts: dict[str, str] = {}
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return {}
            while len(head := fh.read(8)) == 8:
                size, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind in (b"IDAT", b"IEND") or size > 1 << 20:
                    break
                data = fh.read(size)
                fh.seek(4, 1)  # the chunk's CRC
                if kind == b"tEXt" and b"\0" in data:
                    key, value = data.split(b"\0", 1)
                    texts[key.decode("latin-1")] = value.decode("latin-1")
    except OSError:
        return {}
    return texts


def has_pose_mark(path: Path) -> bool:
    """Whether `path` is a PNG carrying POSE_MARK: a pose map loraforge wrote, whatever its
    name."""
    return png_texts(path).get(POSE_MARK[0]) == POSE_MARK[1]


def sniff_file(path: Path) -> str | None:
    """What a file's content says it is (see `sniff_bytes`); None when unknown or unreadable,
    or not a regular file (opening a FIFO would wait for a writer forever)."""
    try:
        if not path.is_file():
            return None
        with open(path, "rb") as fh:
            return sniff_bytes(fh.read(_HEAD_BYTES))
    except OSError:
        return None


def is_image_kind(kind: str | None) -> bool:
    return kind in _IMAGE_KINDS


# --- opening --------------------------------------------------------------------------------

def _not_readable(path: Path) -> ForgeError:
    """The error for a file Pillow cannot identify: empty, another type, or unreadable data."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return ForgeError(f"cannot be read ({exc.strerror})", path=path,
                          fix="check that the file exists and is readable (chmod a+r)")
    if size == 0:
        return ForgeError("is empty (0 bytes)", path=path,
                          fix="copy it again from the original (an interrupted copy or download "
                              "leaves empty files), or delete it")
    kind = sniff_file(path)
    if kind in SUPPORTED_KIND_EXTENSION:
        return ForgeError(f"is {kind} but its data is corrupt or truncated", path=path,
                          fix=_FIX_CORRUPT)
    if is_image_kind(kind):
        return ForgeError(f"is {kind}, which cannot be read here", path=path, fix=_FIX_CONVERT)
    if kind is not None:
        return ForgeError(f"is not an image (it is {kind})", path=path, fix=_FIX_NOT_IMAGE)
    return ForgeError("is not an image (its content is no image format this tool reads)",
                      path=path, fix=f"{_FIX_CONVERT}; if it should be an image, {_FIX_CORRUPT}")


def _open(path: Path) -> Image.Image:
    path = Path(path)
    if path.is_dir():
        raise ForgeError("is a folder, not an image", path=path, fix="give the image file")
    try:
        with warnings.catch_warnings():
            # 89-179 megapixels: Pillow warns without naming the file; such a picture is
            # decoded like any other (the error above that size is reported below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path, formats=_FORMATS)
    except UnidentifiedImageError:
        raise _not_readable(path) from None
    except Image.DecompressionBombError as exc:
        raise ForgeError(f"is too large to decode safely ({exc})", path=path,
                         fix="downscale it (a few megapixels is plenty) or delete it") from None
    except FileNotFoundError:
        raise ForgeError("does not exist", path=path,
                         fix="check the path; run `loraforge dataset check` again") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # OSError covers unreadable files and damaged headers; Pillow also raises SyntaxError
        # and ValueError for some malformed headers.
        if isinstance(exc, PermissionError):
            raise ForgeError("cannot be read (permission denied)", path=path,
                             fix="make it readable: chmod a+r FILE") from None
        raise ForgeError(f"is corrupt ({exc})", path=path, fix=_FIX_CORRUPT) from None
    if im.mode not in _MODES:
        im.close()
        raise ForgeError(f"uses the colour mode {im.mode}, which cannot be converted to RGB",
                         path=path, fix="re-save it as an ordinary RGB PNG or JPEG") from None
    return im


def _decode(im: Image.Image, path: Path) -> None:
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        im.close()
        reason = str(exc) or type(exc).__name__
        raise ForgeError(f"is corrupt or truncated ({reason})", path=path,
                         fix=_FIX_CORRUPT) from None


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        return 1
    return value if isinstance(value, int) else 1


def prepare_decoders() -> None:
    """Register every Pillow decoder now (call once before probing from several threads)."""
    Image.init()


def probe_image(path: Path) -> tuple[int, int]:
    """(width, height) as the image will be trained (EXIF orientation applied).

    The file is decoded completely (JPEGs at 1/8 scale, which still reads every byte), so a
    truncated or corrupt file is reported here and not halfway through a training run.
    """
    path = Path(path)
    im = _open(path)
    try:
        frames = getattr(im, "n_frames", 1)
        if frames > 1 and im.format != "MPO":  # MPO: a camera's JPEG with its preview inside
            raise ForgeError(f"holds {frames} frames (an animation, or pages): training would "
                             "see the first one only", path=path,
                             fix="save the frame you want as a PNG or JPEG in its place, or "
                                 "delete it")
        width, height = im.size
        if im.format in ("JPEG", "MPO"):
            im.draft(None, (1, 1))  # DCT scaling: decodes the whole stream, 64x less work
        _decode(im, path)
        if _orientation(im) in _SWAPS_SIDES:
            width, height = height, width
    finally:
        im.close()
    return width, height


def load_image(path: Path, fit: tuple[int, int] | None = None) -> Image.Image:
    """The image as trained: RGB, fully decoded, EXIF orientation applied, alpha on white.

    ``fit`` (width, height): the box the caller will scale the image into. A JPEG is then decoded
    at 1/2, 1/4 or 1/8 scale where it still fills that box (either way round), which bounds the
    memory a huge photo takes.
    """
    path = Path(path)
    im = _open(path)
    try:
        if fit is not None and im.format in ("JPEG", "MPO"):
            w, h = im.size
            scale = max(min(fit[0] / w, fit[1] / h), min(fit[1] / w, fit[0] / h))
            if scale < 1:
                im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        _decode(im, path)
        try:
            oriented = ImageOps.exif_transpose(im)
        except (OSError, SyntaxError, ValueError, TypeError, KeyError):
            oriented = im  # unreadable EXIF: keep the pixels as stored
        out = to_rgb(oriented)
        if out is im:  # detach from the file (multi-frame formats keep it open otherwise)
            out = im.copy()
    finally:
        im.close()
    return out


# --- colour --------------------------------------------------------------------------------

def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """I;16 / I / F grayscale -> 8-bit L, scaling (Pillow's own convert clips at 255)."""
    if im.mode == "F":
        _, high = im.getextrema()
        scale = 255.0 if high <= 1.0 else (255.0 / high if high > 255 else 1.0)
        return im.point(lambda v: v * scale + 0.5).convert("L")
    if im.mode != "I":
        im = im.convert("I")
    _, high = im.getextrema()
    if high <= 255:
        return im.convert("L")
    scale = 1 / 257 if high <= 65535 else 255 / high
    return im.point(lambda v: v * scale + 0.5).convert("L")


def _on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any supported mode -> RGB; transparency is composited on white."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        im = _high_bit_depth_to_l(im)
        mode = im.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        return _on_white(im)
    if "transparency" in im.info and mode in ("P", "L", "RGB", "1"):
        return _on_white(im)
    if mode == "RGB":
        return im
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise ForgeError(f"cannot be converted to RGB ({exc})",
                         path=getattr(im, "filename", None) or None,
                         fix="re-save it as an ordinary RGB PNG or JPEG") from None
