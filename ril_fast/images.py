"""Images as the model sees them: read by path, turned upright by their EXIF orientation, checked, sized, sent.

Which way is up is ``ImageOps.exif_transpose``'s answer (the EXIF orientation tag, or XMP's), which
:func:`load_image` applies as HF image processors do; :func:`orientation` says, from an opened file without its
pixels where the file allows it, whether that turns or flips the image, and three readers follow it:

* ``ril_fast.processor`` loads each image with :func:`load_image`;
* ``ril_fast.data`` checks each image of a data file and reads its upright (width, height) (:func:`checked_sizes`,
  :func:`upright_size`), so that prompt lengths are counted before training without the pixels;
* ``ril_fast.teacher`` sends a server teacher each image as a ``data:`` URL (:func:`data_url`), turned upright
  first (:func:`upright`) when its orientation turns or flips it, since some servers ignore the orientation.
"""

import base64
import io
import mimetypes
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose reads
# Where a PNG may hold an orientation (an eXIf chunk, ImageMagick's EXIF profile, XMP): the bytes that mark each in
# the file -> the key of Pillow's ``info`` that holds it once read. Opening reads the chunks before the pixels only;
# ``getexif()`` decodes the pixels to look for an eXIf chunk after them, which a file without these marks is spared.
_PNG_ORIENTATION_CHUNKS = {b"eXIf": "exif", b"Raw profile type exif": "Raw profile type exif",
                           b"XML:com.adobe.xmp": "XML:com.adobe.xmp"}


def orientation(im, raw: bytes | None = None) -> int | None:
    """The EXIF (or XMP) orientation of an opened PIL image ``im`` when it turns or flips the image (2..8, as
    :func:`load_image` applies it), else None (none, 1, or a value out of 2..8). A PNG is looked at further (then
    ``getexif()`` decodes it) only when it may hold an orientation: given ``raw``, the file's bytes, when one of the
    chunks' marks is anywhere in them; else when a chunk read with its header (before the pixels) is one, so that
    an eXIf chunk after the pixels goes unseen. Any other format's orientation is read without the pixels."""
    if im.format == "PNG":
        if raw is not None and not any(mark in raw for mark in _PNG_ORIENTATION_CHUNKS):
            return None
        if raw is None and not im.info.keys() & _PNG_ORIENTATION_CHUNKS.values():
            return None
    value = im.getexif().get(ORIENTATION)
    return value if value in range(2, 9) else None


def load_image(image):
    """A PIL image, or a path to one, as the RGB image HF image processors would see: EXIF orientation
    applied, transparency composited onto white (transformers' ``convert_to_rgb``; a plain
    ``convert("RGB")`` would turn a transparent background black). A file that cannot be decoded (changed since
    the data was checked) is a ValueError naming it."""
    from PIL import Image, ImageOps
    from transformers.image_transforms import convert_to_rgb

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                return load_image(im)
        except OSError as e:  # PIL's words for a missing, unknown or cut-off file
            raise ValueError(f"cannot read image {image}: {e}") from None
    return Image.fromarray(convert_to_rgb(ImageOps.exif_transpose(image), return_numpy=True))


# ----------------------------------------------------------------------------------------------------
# A data file's images: checked, and their size upright, without decoding more than needed
# ----------------------------------------------------------------------------------------------------
def upright_size(im) -> tuple[int, int]:
    """(width, height) of an opened PIL image as :func:`load_image` will give it: turned upright by its EXIF (or XMP)
    orientation (:func:`orientation`, read without the file's bytes: a PNG's eXIf chunk after its pixels goes
    unseen, and a prompt that this makes longer than counted is still stopped by the step's own check). A TIFF's
    size is taken as Pillow gives it: Pillow turns a TIFF upright as it opens it."""
    if im.format != "TIFF" and orientation(im) in (5, 6, 7, 8):  # a quarter turn swaps them
        return im.size[::-1]
    return im.size


def checked_sizes(paths: list[Path]) -> list[tuple[int, int] | Exception]:
    """Each image checked with PIL and its upright (width, height) (:func:`_checked_size`), in ``paths``' order, in
    threads (PIL decodes without the GIL); for an image PIL cannot read, the exception that says why."""
    workers = min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_checked_size, paths))


def _checked_size(path: Path) -> tuple[int, int] | Exception:
    """The image's (width, height) as the model sees it, turned upright by its EXIF orientation
    (:func:`load_image`), so prompt lengths can be counted without the pixels (:func:`upright_size`); or the
    exception that says why PIL cannot read it. ``verify()`` reads a PNG whole but decodes nothing of a JPEG, whose
    pixels are decoded at 1/8 scale (their DCT's coarsest: 2-5 ms for a 1.2-megapixel photo on one core, 1.3-2.3x
    faster than in full), nor of any other format (GIF, BMP, TIFF, WebP, ...), decoded in full: a file cut short,
    as by an interrupted download, or with bytes corrupted, is found here, not at the step that first draws it."""
    from PIL import Image, JpegImagePlugin

    try:
        with Image.open(path) as im:
            im.verify()  # it must come first after opening, and leaves the image unusable
        with Image.open(path) as im:
            size = upright_size(im)
            if isinstance(im, JpegImagePlugin.JpegImageFile):  # MPO (a phone's multi-picture JPEG) too
                im.draft(None, (1, 1))
                im.load()
            elif im.format != "PNG":
                im.load()
            if problem := _beyond_8_bits(im):
                return ValueError(problem)
        return size
    except Exception as e:  # PIL raises many types for a broken file
        return e


def _beyond_8_bits(im) -> str | None:
    """Why the opened image's pixels would not survive the RGB conversion every image processor makes (8 bits a
    channel: :func:`load_image`), or None: 16-bit pixels are clipped (a 16-bit photo comes out nearly white),
    floating-point ones (0..1) come out black; 32-bit integer ones only where some exceed 255."""
    if im.mode.startswith("I;16") or im.mode == "F" or (im.mode == "I" and im.getextrema()[1] > 255):
        return (f"its pixels are {'floating-point' if im.mode == 'F' else 'more than 8-bit'} (PIL mode {im.mode}), "
                f"which the image processors' conversion to 8-bit RGB clips (a 16-bit image comes out nearly white, a "
                f"0..1 float one black): save it as 8-bit")
    return None


# ----------------------------------------------------------------------------------------------------
# An image sent to a server, upright
# ----------------------------------------------------------------------------------------------------
def upright(raw: bytes) -> tuple[bytes, str] | None:
    """The image file ``raw`` turned upright by its EXIF (or XMP) orientation as :func:`load_image` turns it
    (``ImageOps.exif_transpose``), as (bytes, MIME type): a JPEG (a phone's photo) encoded again as JPEG at quality
    95 without chroma subsampling (as PNG, a 12-megapixel photo's 3.3 MiB became 24.5 MiB), any other format as
    PNG; None when the orientation neither turns nor flips it (:func:`orientation`, which looks for a PNG's anywhere
    in ``raw``), or Pillow cannot read the file (then sent as it is, for the server to judge). A TIFF with an
    orientation is sent turned, as PNG, though Pillow turns it as it opens it: a server may not read it with Pillow."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(raw)) as im:
            if orientation(im, raw) is None:
                return None
            jpeg = im.format in ("JPEG", "MPO")
            turned = ImageOps.exif_transpose(im)
    except Exception:  # PIL raises many types for a file it cannot read; the data's own checks opened it
        return None
    buffer = io.BytesIO()
    if jpeg:
        turned.convert("L" if turned.mode == "L" else "RGB").save(buffer, format="JPEG", quality=95, subsampling=0)
        return buffer.getvalue(), "image/jpeg"
    if turned.mode == "I":  # 32-bit integers, which PNG does not hold: of 8 bits (the data's check), as load_image
        turned = turned.convert("L")  # reads them (clipped to 0..255)
    elif turned.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):  # what PNG holds
        turned = turned.convert("RGBA" if "A" in turned.mode else "RGB")
    turned.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


def data_url(path: Path) -> str:
    """The image file at ``path`` as a ``data:`` URL: its bytes as they are (its MIME type from the file name), but
    for an image whose EXIF orientation turns or flips it, sent upright (:func:`upright`): a server that ignores
    the orientation (SGLang, llama.cpp) would see what ril_fast's own loader turns upright askew."""
    raw = path.read_bytes()
    if (turned := upright(raw)) is not None:
        return f"data:{turned[1]};base64,{base64.b64encode(turned[0]).decode()}"
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"
