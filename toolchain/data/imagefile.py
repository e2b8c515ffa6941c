"""One image file -> one uint8 frame, the same way in training and on the device.

Needs only numpy and Pillow: the package stage copies this file next to infer.py, so the
device prepares a photo with this very code (and the toolchain's decode-once cache is built
with it). Real-world files are converted, not crashed on: EXIF rotation is applied,
greyscale / palette / CMYK / 16-bit / alpha images become 8-bit RGB or grey (alpha is
composited over white, what a viewer shows).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
FILTERS = ("nearest", "bilinear", "bicubic")


class ImageFileError(Exception):
    """A file that is not a readable image; the message is one line naming it."""


def _filter(name: str):
    from PIL import Image

    return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[name]


def _to_8bit(img):
    """16-bit and 32-bit integer / float grey (PNG I;16, TIFF I and F) -> 8-bit L."""
    from PIL import Image

    pixels = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
    if img.mode == "F" and pixels.size and 0 <= pixels.min() and pixels.max() <= 1:
        top = 1.0  # float TIFFs are usually on the 0-1 scale; read as 0-255 they came out black
    return Image.fromarray(np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def convert(img, mode: str):
    """A decoded PIL image -> 8-bit 'RGB' or 'L' (mode 'grey')."""
    from PIL import Image

    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("L" if mode == "grey" else "RGB")


def read_image(path, mode: str = "RGB"):
    """Decode fully (a truncated file fails here, not later), upright, 8-bit RGB or grey."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            return convert(img, mode)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise ImageFileError(f"cannot read image {path} ({type(exc).__name__}: {text})") from None


def fit_frame(img, frame: Sequence[int], fit: str = "cover", interpolation: str = "bilinear"):
    """To the frame (height, width). cover: scale so the image covers the frame, centre-crop
    (a photo keeps its aspect ratio, as torchvision's Resize + CenterCrop). pad: images that
    fit are zero-padded, centred (Fashion-MNIST 28x28 -> 32x32); larger ones are covered."""
    from PIL import Image

    height, width = int(frame[0]), int(frame[1])
    if fit == "pad" and img.width <= width and img.height <= height:
        canvas = Image.new(img.mode, (width, height), 0)
        canvas.paste(img, ((width - img.width) // 2, (height - img.height) // 2))
        return canvas
    if img.size == (width, height):
        return img
    scale = max(width / img.width, height / img.height)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(size, _filter(interpolation))
    left, top = crop_offset(size[0], width), crop_offset(size[1], height)
    return img.crop((left, top, left + width, top + height))


def crop_offset(size: int, crop: int) -> int:
    """Where a centred crop starts (torchvision's rounding)."""
    return int(round((size - crop) / 2.0))


def frame_array(img) -> np.ndarray:
    """PIL image -> uint8 (C, H, W)."""
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def load_frame(
    path, frame: Sequence[int], mode: str = "RGB", fit: str = "cover", interpolation: str = "bilinear"
) -> Tuple[np.ndarray, bool]:
    """One file -> (uint8 (C, H, W) frame, whether it had to be enlarged to cover the frame)."""
    img = read_image(path, mode)
    small = img.height < frame[0] or img.width < frame[1]
    return frame_array(fit_frame(img, frame, fit, interpolation)), small


def eval_view(img, resize: Sequence[int], crop: Sequence[int], interpolation: str = "bilinear"):
    """The evaluation view of a frame: resize to `resize` (skipped when equal), centre-crop to `crop`."""
    if img.size != (resize[1], resize[0]):
        img = img.resize((int(resize[1]), int(resize[0])), _filter(interpolation))
    left, top = crop_offset(img.width, int(crop[1])), crop_offset(img.height, int(crop[0]))
    return img.crop((left, top, left + int(crop[1]), top + int(crop[0])))


def model_input(path, contract: dict) -> np.ndarray:
    """An image file -> the model's (C, H, W) float32 input, as the contract (preprocess.json) says."""
    img = read_image(path, contract["image_mode"])
    img = fit_frame(img, contract["frame"], contract["fit"], contract["interpolation"])
    img = eval_view(img, contract["resize"], contract["crop"], contract["interpolation"])
    pixels = frame_array(img).astype(np.float32) / float(contract["pixel_scale"])
    channels = contract["input_shape"][1]
    if pixels.shape[0] != channels:  # grey: one plane repeated to the model's channels, as in training
        pixels = np.repeat(pixels, channels, axis=0)
    mean = np.asarray(contract["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(contract["std"], dtype=np.float32)[:, None, None]
    return ((pixels - mean) / std).astype(np.float32)
