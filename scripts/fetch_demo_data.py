"""Fetch the demo model's training photographs from Debian's wallpaper packages (never at job run time).

No image data set can be downloaded on the project's machines, but Debian's packages can. Two wallpaper
packages hold real high-resolution photographs with stated licences (their ``copyright`` files):

- ``mate-backgrounds`` (``nature/``: 12 photographs, 1.3-2.5K, GPL-2+),
- ``plasma-workspace-wallpapers`` (about 12 photographs among 30 wallpapers, GPL-2+; the rest are
  illustrations, kept apart for the Manga109-like side of the RTM).

The script runs ``apt-get download`` + ``dpkg -x`` (no install, no root needed beyond apt's cache), picks
the files listed below and writes, under ``--out`` (default ``data/demo``, ignored by git):

- ``photos/<name>_1024.png`` and ``photos/<name>_512.png``: every training photograph resized (Lanczos)
  to a long side of 1024 and 512 px, two scales of the same scene;
- ``illustrations/<name>_1024.png``: the illustrations (not used by the demo recipe's trainers);
- ``val/<name>.png``: two validation photographs, long side 512, for the GRM's group calibration;
- ``heldout/<name>.png``: the held-out photographs, long side 512, never trained on;
- ``LICENSES.md``: the licence table, built from the packages' copyright files.

``--write-assets`` also copies the held-out photographs into ``assets/heldout/`` and writes their LR
versions (the project's Real-ESRGAN degradation, fixed seeds) into ``assets/samples/``: that is what the
repository ships (a few hundred KB), not the 140 MB of packages.

    python scripts/fetch_demo_data.py                   # data/demo, about 1 minute
    python scripts/fetch_demo_data.py --write-assets    # also refresh assets/heldout + assets/samples
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mate-backgrounds": "1.26.0-1", "plasma-workspace-wallpapers": "4:5.27.5-2"}
MATE = "usr/share/backgrounds/mate"
PLASMA = "usr/share/wallpapers"

# name -> (package, path inside the package: a file, or a Plasma wallpaper folder), by role
TRAIN_PHOTOS: dict[str, tuple[str, str]] = {
    **{n.lower(): ("mate-backgrounds", f"{MATE}/nature/{n}.jpg") for n in (
        "Aqua", "Blinds", "FreshFlower", "GreenMeadow", "RainDrops", "TwoWings", "Wood", "YellowFlower")},
    **{n.lower(): ("plasma-workspace-wallpapers", f"{PLASMA}/{n}") for n in (
        "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "FallenLeaf", "Grey", "Kite",
        "OneStandsOut", "summer_1am", "Volna")},
}
# Validation (never trained on): what train-grm calibrates PGS's thresholds on (trainer/calibrate.py).
VAL_PHOTOS: dict[str, tuple[str, str]] = {
    "garden": ("mate-backgrounds", f"{MATE}/nature/Garden.jpg"),
    "storm": ("mate-backgrounds", f"{MATE}/nature/Storm.jpg"),
}
# Held out (never trained on, never used to choose anything): the model card's test images.
HELDOUT_PHOTOS: dict[str, tuple[str, str]] = {
    "ladybird": ("mate-backgrounds", f"{MATE}/nature/LadyBird.jpg"),
    "dune": ("mate-backgrounds", f"{MATE}/nature/Dune.jpg"),
    "eveningglow": ("plasma-workspace-wallpapers", f"{PLASMA}/EveningGlow"),
    "path": ("plasma-workspace-wallpapers", f"{PLASMA}/Path"),
}
ILLUSTRATIONS: dict[str, tuple[str, str]] = {
    n.lower(): ("plasma-workspace-wallpapers", f"{PLASMA}/{n}") for n in (
        "Altai", "Autumn", "Canopee", "Cascade", "Cluster", "Elarun", "Flow", "FlyingKonqui", "Honeywave",
        "IceCold", "Kay", "Kokkini", "MilkyWay", "Opal", "PastelHills", "Patak", "SafeLanding", "Shell")
}
SAMPLE_SEEDS = {"ladybird": 2001, "dune": 2002, "eveningglow": 2003, "path": 2004}


def fetch(cache: Path) -> Path:
    """Download and unpack the packages into ``cache/root``; returns that folder."""
    root = cache / "root"
    if (root / MATE).is_dir() and (root / PLASMA).is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    for name, version in PACKAGES.items():
        subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=cache, check=True)
    for deb in sorted(cache.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def source_file(root: Path, path: str) -> Path:
    """The file itself, or the largest image of a Plasma wallpaper folder (``contents/images/WxH.ext``)."""
    p = root / path
    if p.is_file():
        return p
    images = list((p / "contents" / "images").glob("*x*.*"))
    if not images:
        raise FileNotFoundError(f"no images in {p}")

    def pixels(f: Path) -> int:
        w, h = re.match(r"(\d+)x(\d+)", f.name).groups()
        return int(w) * int(h)

    return max(images, key=pixels)


def resized(path: Path, long_side: int) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = long_side / max(im.size)
        size = (round(im.width * scale) // 4 * 4, round(im.height * scale) // 4 * 4)  # x4 SR: multiples of 4
        return im.resize(size, Image.Resampling.LANCZOS)


def licence_table(root: Path, used: dict[str, dict[str, tuple[str, str]]]) -> str:
    rows = ["| file | role | package | path in package | licence (package copyright file) |",
            "|---|---|---|---|---|"]
    licences = {pkg: _licence_of(root, pkg) for pkg in PACKAGES}
    for role, table in used.items():
        for name, (pkg, path) in sorted(table.items()):
            rows.append(f"| {name} | {role} | {pkg} {PACKAGES[pkg]} | `{path}` | {licences[pkg](path)} |")
    return "\n".join(rows) + "\n"


def _licence_of(root: Path, package: str):
    """path -> 'Licence (copyright holders)' from the package's DEP-5 copyright file."""
    text = (root / "usr/share/doc" / package / "copyright").read_text(encoding="utf-8")
    stanzas = []
    for block in text.split("\n\n"):
        files = re.search(r"^Files:(.*?)(?=^\S)", block + "\nX", re.S | re.M)
        lic = re.search(r"^License: *(\S+)", block, re.M)
        holders = re.search(r"^Copyright:(.*?)(?=^\S)", block + "\nX", re.S | re.M)
        if files and lic:
            pats = files.group(1).split()
            who = " ".join(holders.group(1).split()) if holders else ""
            stanzas.append((pats, lic.group(1), who))

    def lookup(path: str) -> str:
        rel = path.split(f"{MATE}/", 1)[-1] if package == "mate-backgrounds" else "*"
        best = "see copyright file"
        for pats, lic, who in stanzas:
            if any(Path(rel).match(p) or p == "*" for p in pats):
                best = f"{lic} ({who})" if who else lic
                if "*" not in pats:
                    break
        return best

    return lookup


def write_assets(heldout_dir: Path) -> None:
    """assets/heldout <- the held-out photographs; assets/samples <- their degraded LR versions."""
    import torch

    from patchscaler.training.degradations import DegradationConfig, degrade_image

    for name in HELDOUT_PHOTOS:
        src = heldout_dir / f"{name}.png"
        shutil.copyfile(src, ROOT / "assets" / "heldout" / f"{name}.png")
        with Image.open(src) as im:
            hr = torch.from_numpy(__import__("numpy").asarray(im.convert("RGB"))).permute(2, 0, 1) / 255.0
        lr = degrade_image(hr, config=DegradationConfig(scale=4), seed=SAMPLE_SEEDS[name])
        arr = (lr.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(ROOT / "assets" / "samples" / f"{name}.png")
        print(f"assets: heldout/{name}.png {hr.shape[2]}x{hr.shape[1]}, samples/{name}.png "
              f"{arr.shape[1]}x{arr.shape[0]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "data" / "demo"), help="output folder")
    p.add_argument("--cache", default=None, help="where the .deb files are unpacked (default OUT/../debian)")
    p.add_argument("--write-assets", action="store_true", help="refresh assets/heldout and assets/samples")
    args = p.parse_args()
    out = Path(args.out)
    root = fetch(Path(args.cache) if args.cache else out.parent / "debian")
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        staging = Path(tmp)
        for name, (_, path) in TRAIN_PHOTOS.items():
            src = source_file(root, path)
            for side in (1024, 512):
                (staging / "photos").mkdir(exist_ok=True)
                resized(src, side).save(staging / "photos" / f"{name}_{side}.png")
        for name, (_, path) in ILLUSTRATIONS.items():
            (staging / "illustrations").mkdir(exist_ok=True)
            resized(source_file(root, path), 1024).save(staging / "illustrations" / f"{name}_1024.png")
        for folder, table in (("val", VAL_PHOTOS), ("heldout", HELDOUT_PHOTOS)):
            (staging / folder).mkdir(exist_ok=True)
            for name, (_, path) in table.items():
                resized(source_file(root, path), 512).save(staging / folder / f"{name}.png")
        used = {"train": TRAIN_PHOTOS, "validation": VAL_PHOTOS, "held out": HELDOUT_PHOTOS,
                "illustration": ILLUSTRATIONS}
        (staging / "LICENSES.md").write_text(licence_table(root, used), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staging, out)
    counts = {d.name: len(list(d.glob("*.png"))) for d in sorted(out.iterdir()) if d.is_dir()}
    print(f"{out}: {counts}")
    if args.write_assets:
        write_assets(out / "heldout")


if __name__ == "__main__":
    main()
