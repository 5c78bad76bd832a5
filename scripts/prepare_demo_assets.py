"""Re-create the demo's images: ``assets/train``, ``assets/textures``, ``assets/heldout``, ``assets/samples``.

The photographs are scikit-image's bundled sample images whose docstrings state public domain or CC0
(see ``assets/LICENSES.md``); scikit-image is needed only to re-run this script, the project does not
depend on it (the assets are committed). The procedural textures are drawn here from fixed seeds.
The LR samples are the held-out images degraded with the project's Real-ESRGAN pipeline (seeded).

    python scripts/prepare_demo_assets.py            # writes under assets/
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchscaler.training.degradations import DegradationConfig, degrade_image

ROOT = Path(__file__).resolve().parent.parent
# file in skimage/data -> (role, output name, preparation)
PHOTOS: dict[str, tuple[str, str, str]] = {
    "astronaut.png": ("train", "astronaut", "as is"),
    "rocket.jpg": ("train", "rocket", "as is"),
    "hubble_deep_field.jpg": ("train", "hubble_deep_field", "centre crop 512"),
    "retina.jpg": ("train", "retina", "resize 512"),
    "text.png": ("train", "text", "as is"),
    "brick.png": ("texture", "grid/brick", "quadrants"),
    "grass.png": ("texture", "fibrous/grass", "quadrants"),
    "gravel.png": ("texture", "bumpy/gravel", "quadrants"),
    "chelsea.png": ("heldout", "chelsea", "crop to a multiple of 4"),
    "coffee.png": ("heldout", "coffee", "centre crop 384"),
    "camera.png": ("heldout", "camera", "as is"),
}
# DTD class -> generator of one procedural texture
PROCEDURAL = ("striped", "chequered", "polka-dotted", "zigzagged", "crosshatched", "marbled", "banded",
              "dotted")
SAMPLE_SEED = 1234


def _prepare(img: Image.Image, how: str) -> list[Image.Image]:
    img = img.convert("RGB")
    w, h = img.size
    if how == "centre crop 512" or how == "centre crop 384":
        s = int(how.rsplit(" ", 1)[1])
        return [img.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))]
    if how == "resize 512":
        return [img.resize((512, 512), Image.Resampling.LANCZOS)]
    if how == "quadrants":
        return [img.crop((x, y, x + w // 2, y + h // 2)) for y in (0, h // 2) for x in (0, w // 2)]
    if how == "crop to a multiple of 4":
        return [img.crop((0, 0, w - w % 4, h - h % 4))]
    return [img]


def _texture(kind: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = rng.uniform(0, math.pi)
    u = x * math.cos(theta) + y * math.sin(theta)
    v = -x * math.sin(theta) + y * math.cos(theta)
    period = rng.uniform(10, 28)
    if kind == "striped":
        t = (np.sin(2 * math.pi * u / period) > 0).astype(float)
    elif kind == "chequered":
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(float)
    elif kind == "polka-dotted":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        t = (du**2 + dv**2 < (period * 0.3) ** 2).astype(float)
    elif kind == "zigzagged":
        t = (np.sin(2 * math.pi * (v + period * np.abs((u / period) % 2 - 1)) / period) > 0).astype(float)
    elif kind == "crosshatched":
        lines_u = np.abs(np.sin(math.pi * u / period)) < 0.15
        t = 1.0 - np.maximum(lines_u, np.abs(np.sin(math.pi * v / period)) < 0.15).astype(float)
    elif kind == "marbled":
        noise = sum(
            np.sin(2 * math.pi * (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)) / rng.uniform(20, 90)
                   + rng.uniform(0, 6.3))
            for _ in range(6)
        )
        t = 0.5 + 0.5 * np.sin(2 * math.pi * u / (period * 4) + 1.5 * noise)
    elif kind == "banded":
        t = 0.5 + 0.5 * np.sin(2 * math.pi * u / (period * 5)) ** 3
    else:  # dotted: random small dots
        t = np.zeros((size, size))
        for cy, cx in rng.uniform(0, size, (400, 2)):
            t[(y - cy) ** 2 + (x - cx) ** 2 < rng.uniform(2, 9)] = 1.0
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    img += rng.normal(0, 0.02, img.shape)  # a little grain
    return (img.clip(0, 1) * 255 + 0.5).astype(np.uint8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "assets"))
    args = p.parse_args()
    import skimage.data  # only for this script

    src = Path(skimage.data.__file__).parent
    out = Path(args.out)
    for file, (role, name, how) in PHOTOS.items():
        folder = {"train": out / "train", "texture": out / "textures", "heldout": out / "heldout"}[role]
        images = _prepare(Image.open(src / file), how)
        for i, img in enumerate(images):
            stem = name if len(images) == 1 else f"{name}_{i}"
            (folder / stem).parent.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{stem}.png", optimize=True)
    rng = np.random.default_rng(2024)
    for kind in PROCEDURAL:
        (out / "textures" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            path = out / "textures" / kind / f"{kind}_{i}.png"
            Image.fromarray(_texture(kind, rng)).save(path, optimize=True)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sorted((out / "heldout").glob("*.png"))):
        hr = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)
        lr = degrade_image(hr.permute(2, 0, 1), config=DegradationConfig(), seed=SAMPLE_SEED + i)
        arr = (lr.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        Image.fromarray(arr).save(out / "samples" / f"{path.stem}.png")
    print(f"assets written under {out}")


if __name__ == "__main__":
    main()
