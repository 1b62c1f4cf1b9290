"""Decoding one image file into model pixels: the one rule of collect, predict and serve.

The imagefolder source decodes training images with it, and ``pipeline.inference`` (``fmpipe
predict`` and ``fmpipe serve``) decodes what a user sends with it, so a file gives the model the
same pixels in training and in service; the package records the policy (``preprocess.json``:
``input.high_bit_depth``). Only numpy and Pillow: importable without torch.

The rule: open; refuse a declared size above ``max_pixels`` before any pixel is decoded; a JPEG
of another size is decoded at a reduced scale (still >= the target, ``Image.draft``); a
16-bit/32-bit/float image (PIL modes I;16*, I, F) is scaled from its type's range to 0..255
(``high_bit_depth: scale``; Pillow's own ``convert`` would clip it) or refused (``reject``);
then the colour mode is converted and a bicubic resize brings it to the target size.
"""

from __future__ import annotations

import io
import re
from typing import NamedTuple, Optional

import numpy as np

# PIL modes holding more than 8 bits per pixel (one channel each) and the value that maps to
# 255. Mode "I" is what Pillow gives many 16-bit files, so its range is 16-bit too; values
# outside the range are refused rather than clipped.
HIGH_BIT_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
                  "I": 65535.0, "F": 1.0}
HIGH_BIT_POLICIES = ("scale", "reject")


class ImageProblem(ValueError):
    """Why a file gives no pixels, in one line that is the same on every run."""


class UnreadableImage(ImageProblem):
    pass


class HighBitDepthRefused(ImageProblem):
    """A high-bit-depth image under ``high_bit_depth: reject``; the message is its PIL mode."""


class SizeRefused(ImageProblem):
    """Another size under ``on_size_mismatch: reject``."""


class TooManyPixels(ImageProblem):
    """The declared size is above the caller's pixel budget (nothing was decoded)."""


class Decoded(NamedTuple):
    pixels: np.ndarray  # H x W x C uint8
    resized: bool
    declared_pixels: int  # width x height as the file declares it


def _to_8bit(im):
    """An 8-bit "L" image from a 16-bit/32-bit/float one, scaled by its type's range."""
    from PIL import Image

    top = HIGH_BIT_MODES[im.mode]
    arr = np.asarray(im, dtype=np.float32 if im.mode == "F" else np.int32)
    if not np.isfinite(arr).all():
        raise ValueError(f"mode {im.mode} image has NaN or infinite pixel values")
    lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
    if lo < 0 or hi > top:
        raise ValueError(f"mode {im.mode} pixel values {lo:g}..{hi:g} outside the expected 0..{top:g}")
    return Image.fromarray(np.rint(arr.astype(np.float64) * (255.0 / top)).astype(np.uint8), mode="L")


def problem_text(exc: Exception) -> str:
    """A reason without object addresses (``<_io.BytesIO object at 0x...>``), on one line."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "unreadable image (not a format Pillow recognises)"
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", " ".join(str(exc).split()))
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    return f"unreadable image ({type(exc).__name__}: {text})"


def decode(data: bytes, channels: int, size: Optional[tuple[int, int]], *, on_size_mismatch: str = "resize",
           high_bit_depth: str = "scale", max_pixels: Optional[int] = None) -> Decoded:
    """One file's bytes as H x W x C uint8 pixels at ``size`` ([H, W]; None: its own size).

    Raises an ``ImageProblem`` subclass (never a Pillow exception) for anything that gives no pixels.
    """
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise TooManyPixels(f"declares {w}x{h} = {w * h / 1e6:.1f} MP, above the {max_pixels / 1e6:g} MP limit")
            if size is not None and (h, w) != tuple(size):
                if on_size_mismatch == "reject":
                    raise SizeRefused(f"size {h}x{w} differs from {size[0]}x{size[1]} (on_size_mismatch: reject)")
                if im.format == "JPEG":
                    # Let libjpeg decode at a reduced scale (still >= the target) before resizing.
                    im.draft(mode, (size[1], size[0]))
            if im.mode in HIGH_BIT_MODES:
                if high_bit_depth == "reject":
                    raise HighBitDepthRefused(im.mode)
                out = _to_8bit(im).convert(mode)
            else:
                out = im.convert(mode)
            resized = size is not None and out.size != (size[1], size[0])
            if resized:
                out = out.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            arr = np.asarray(out, dtype=np.uint8)
    except ImageProblem:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked in Image.open itself
        if max_pixels is not None:
            raise TooManyPixels(f"is over Pillow's decompression-bomb limit ({problem_text(exc)})") from None
        raise UnreadableImage(problem_text(exc)) from None
    except Exception as exc:  # Pillow raises many types for bad bytes; each is one clear reason
        raise UnreadableImage(problem_text(exc)) from None
    return Decoded(arr.reshape(arr.shape[0], arr.shape[1], channels), resized, w * h)
