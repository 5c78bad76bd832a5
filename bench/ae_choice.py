"""Which autoencoder can a 2-core CPU train for the `tiny` demo? Held-out round-trip PSNR after N steps.

    python bench/ae_choice.py --data data/demo/photos --steps 300            # the table in docs/model.md
    python bench/ae_choice.py --data data/demo/photos --only dc-f4c8 --loss l1,mse --steps 600

Every candidate is trained from scratch with the same data (random 64 px crops of ``--data``, batch 16,
AdamW, warm-up 50 steps then cosine), the same number of steps and seed, then scored on the held-out
photographs (``assets/heldout``, never trained on): mean RGB PSNR of decode(encode(HR)) and the
sharpness ratio (mean |gradient| of the reconstruction / of the original). Two references need no
deep network: the blockwise PCA bound (the best *linear* code of f x f x 3 pixel blocks with C numbers)
and a linear strided-conv autoencoder trained the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from patchscaler.autoencoder import build_vae, raw_latent
from patchscaler.config import AutoencoderConfig
from trainer.data import list_images, read_image

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES: dict[str, AutoencoderConfig] = {
    "kl-f8c4": AutoencoderConfig(kind="kl", block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                                 latent_channels=4, norm_num_groups=8),
    "kl-f4c8": AutoencoderConfig(kind="kl", block_out_channels=(32, 64, 64), layers_per_block=1,
                                 latent_channels=8, norm_num_groups=8),
    "dc-f8c16": AutoencoderConfig(kind="dc", block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                                  latent_channels=16),
    "dc-f4c4": AutoencoderConfig(kind="dc", block_out_channels=(32, 64, 64), layers_per_block=1,
                                 latent_channels=4),
    "dc-f4c8": AutoencoderConfig(kind="dc", block_out_channels=(32, 64, 64), layers_per_block=1,
                                 latent_channels=8),
}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / max(float(((a.clamp(0, 1) - b) ** 2).mean()), 1e-12))


def sharpness(a: torch.Tensor, b: torch.Tensor) -> float:
    def grad(z: torch.Tensor) -> torch.Tensor:
        return (z[..., 1:, :] - z[..., :-1, :]).abs().mean() + (z[..., :, 1:] - z[..., :, :-1]).abs().mean()

    return float(grad(a.clamp(0, 1)) / grad(b))


def crops(images: list[torch.Tensor], n: int, size: int, g: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(n):
        im = images[int(torch.randint(len(images), (1,), generator=g))]
        h, w = im.shape[-2:]
        top, left = (int(torch.randint(s - size + 1, (1,), generator=g)) for s in (h, w))
        out.append(im[:, top:top + size, left:left + size])
    return torch.stack(out)


def recon_loss(r: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l1":
        return (r - x).abs().mean()
    loss = ((r - x) ** 2).mean()
    if kind.startswith("mse+fft"):  # "mse+fft" (weight 0.01) or "mse+fft0.1"
        weight = float(kind[7:] or 0.01)
        spectrum = torch.fft.rfft2(r, norm="ortho") - torch.fft.rfft2(x, norm="ortho")
        loss = loss + weight * spectrum.abs().mean()
    return loss


def train_and_score(name: str, model: nn.Module, encode, decode, f: int, images: list[torch.Tensor],
                    held: dict[str, torch.Tensor], args: argparse.Namespace, loss_kind: str,
                    lr: float) -> dict:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        x = crops(images, 16, 64, g) * 2 - 1
        loss = recon_loss(decode(encode(x)), x, loss_kind)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    scores, sharp = {}, []
    with torch.no_grad():
        for key, im in held.items():
            h, w = im.shape[-2] // f * f, im.shape[-1] // f * f
            x = im[None, :, :h, :w]
            r = (decode(encode(x * 2 - 1)) + 1) / 2
            scores[key] = round(psnr(r, x), 2)
            sharp.append(sharpness(r, x))
    mean = round(sum(scores.values()) / len(scores), 2)
    return {"candidate": name, "loss": loss_kind, "lr": lr, "steps": args.steps, "psnr_mean": mean,
            "sharpness": round(sum(sharp) / len(sharp), 3), "psnr": scores, "seconds": round(seconds, 1),
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}


def pca_bound(images: list[torch.Tensor], held: dict[str, torch.Tensor], f: int, c: int) -> float:
    def blocks(im: torch.Tensor) -> torch.Tensor:
        h, w = im.shape[-2] // f * f, im.shape[-1] // f * f
        x = im[:, :h, :w].reshape(3, h // f, f, w // f, f)
        return x.permute(1, 3, 0, 2, 4).reshape(-1, 3 * f * f)  # (blocks, 3 f f)

    data = torch.cat([blocks(im) for im in images])
    data = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:200_000]]
    mu = data.mean(0)
    _, _, v = torch.pca_lowrank(data - mu, q=c, center=False)
    values = []
    for im in held.values():
        b = blocks(im)
        values.append(psnr((b - mu) @ v @ v.T + mu, b))
    return round(sum(values) / len(values), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data/demo/photos"), help="training images")
    p.add_argument("--heldout", default=str(ROOT / "assets/heldout"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--only", default=",".join(CANDIDATES), help="comma-separated candidates")
    p.add_argument("--loss", default="mse", help="comma-separated: l1, mse, mse+fft, mse+fft0.1")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-references", action="store_true", help="skip the PCA bound and the linear AE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = [im for im in (read_image(f) for f in list_images(args.data)) if im is not None]
    held = {Path(f).stem: read_image(f) for f in list_images(args.heldout)}
    rows = []
    if not args.no_references:
        for f, c in ((8, 4), (8, 16), (4, 4), (4, 8)):
            rows.append({"candidate": f"pca-f{f}c{c}", "psnr_mean": pca_bound(images, held, f, c)})
            print(json.dumps(rows[-1]), flush=True)
        lin = nn.ModuleDict({"enc": nn.Conv2d(3, 8, 4, stride=4),
                             "dec": nn.ConvTranspose2d(8, 3, 4, stride=4)})
        rows.append(train_and_score("linear-f4c8", lin, lin["enc"], lin["dec"], 4, images, held, args, "mse",
                                    1e-2))
        print(json.dumps(rows[-1]), flush=True)
    for name in args.only.split(","):
        cfg = CANDIDATES[name]
        for loss in args.loss.split(","):
            torch.manual_seed(args.seed)
            vae = build_vae(cfg)
            rows.append(train_and_score(name, vae, lambda x, v=vae: raw_latent(v, x),
                                        lambda z, v=vae: v.decode(z).sample, cfg.downsample_factor, images,
                                        held, args, loss, args.lr))
            print(json.dumps(rows[-1]), flush=True)
    width = max(len(r["candidate"]) for r in rows)
    for r in rows:
        print(f"{r['candidate']:<{width}}  {r.get('loss', ''):<10} {r['psnr_mean']:6.2f} dB  "
              f"sharpness {r.get('sharpness', '')}")


if __name__ == "__main__":
    main()
