"""IQA metrics (pyiqa) loaded offline from a local weight cache, and a per-image scorer.

The metric cache is a folder laid out like torch hub's (``$TORCH_HOME/hub``), which is where pyiqa puts
what it downloads, so a cache filled once on a machine with network can be copied as is:

- ``pyiqa/<file>``: pyiqa's own checkpoints (``pyiqa.utils.download_util.DEFAULT_CACHE_DIR``);
- ``checkpoints/<file>``: torchvision backbones (``torch.hub.load_state_dict_from_url``), e.g. LPIPS' AlexNet;
- ``clip/<file>``: OpenAI CLIP models (CLIP-IQA).

The folder is ``--metric-cache``, else ``$PATCHSCALER_IQA_CACHE``, else torch hub's folder. Every file a
metric needs is checked **before** pyiqa runs; a missing one (or one whose SHA-256 is not that of
:data:`FILE_SHA256`) is a :class:`MissingWeightsError` naming the files, the folder and where to get them
(``docs/evaluation.md``). While a metric is built, pyiqa's and torch hub's download functions are replaced
by one that raises, so nothing is ever fetched at run time.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

CACHE_ENV = "PATCHSCALER_IQA_CACHE"
PYIQA_VERSION = "0.1.16"  # the version whose file names and options this registry follows (installed_version)
_HF = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"
_CLIP_RN50_SHA = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"


@dataclass(frozen=True)
class MetricSpec:
    name: str  # our name (``--metrics``)
    pyiqa_name: str  # pyiqa.create_metric name
    needs_reference: bool  # full-reference (PSNR/SSIM/LPIPS) or no-reference
    lower_better: bool
    files: tuple[tuple[str, str], ...] = ()  # (path inside the cache, where to download it)
    options: Mapping[str, Any] = field(default_factory=dict)  # extra pyiqa options
    crop_border: bool = False  # crop `scale` pixels off each side before scoring (SR convention)
    modules: tuple[str, ...] = ()  # Python modules the pyiqa arch imports
    backbone_in_checkpoint: bool = False  # the pyiqa checkpoint holds the timm backbone too
    paper_name: str = ""  # column name in the paper's Tables 1-2
    note: str = ""


_Y = {"test_y_channel": True, "color_space": "ycbcr"}  # BT.601 Y, as BasicSR / the SR papers

METRICS: dict[str, MetricSpec] = {s.name: s for s in (
    MetricSpec(name="psnr", pyiqa_name="psnr", needs_reference=True, lower_better=False, options=_Y,
               crop_border=True, paper_name="PSNR", note="Y channel (BT.601), border cropped"),
    MetricSpec(name="ssim", pyiqa_name="ssim", needs_reference=True, lower_better=False, options=_Y,
               crop_border=True, paper_name="SSIM", note="Y channel (BT.601), border cropped"),
    MetricSpec(name="lpips", pyiqa_name="lpips", needs_reference=True, lower_better=True, paper_name="LPIPS",
               files=(("pyiqa/LPIPS_v0.1_alex-df73285e.pth", _HF + "LPIPS_v0.1_alex-df73285e.pth"),
                      ("checkpoints/alexnet-owt-7be5be79.pth",
                       "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth")),
               note="LPIPS v0.1, AlexNet"),
    MetricSpec(name="maniqa-pipal", pyiqa_name="maniqa-pipal", needs_reference=False, lower_better=False,
               files=(("pyiqa/MANIQA_PIPAL-ae6d356b.pth", _HF + "MANIQA_PIPAL-ae6d356b.pth"),),
               backbone_in_checkpoint=True, paper_name="ManIQA", note="MANIQA trained on PIPAL"),
    MetricSpec(name="maniqa-koniq", pyiqa_name="maniqa", needs_reference=False, lower_better=False,
               files=(("pyiqa/ckpt_koniq10k.pt", _HF + "ckpt_koniq10k.pt"),),
               backbone_in_checkpoint=True,  # pyiqa's default `maniqa`; not the paper's column (PIPAL's is)
               note="MANIQA trained on KonIQ-10k (pyiqa's maniqa), shown apart from the paper's ManIQA"),
    MetricSpec(name="clipiqa", pyiqa_name="clipiqa", needs_reference=False, lower_better=False,
               files=(("clip/RN50.pt", "https://openaipublic.azureedge.net/clip/models/"
                       f"{_CLIP_RN50_SHA}/RN50.pt"),),
               modules=("clip",), paper_name="CLIPIQA", note="CLIP-IQA, RN50, pyiqa's prompt ensemble"),
    MetricSpec(name="musiq", pyiqa_name="musiq", needs_reference=False, lower_better=False,
               files=(("pyiqa/musiq_koniq_ckpt-e95806b9.pth", _HF + "musiq_koniq_ckpt-e95806b9.pth"),),
               paper_name="MUSIQ", note="MUSIQ trained on KonIQ-10k"),
    MetricSpec(name="piqe", pyiqa_name="piqe", needs_reference=False, lower_better=True, note="no weights"),
    MetricSpec(name="niqe", pyiqa_name="niqe", needs_reference=False, lower_better=True,
               files=(("pyiqa/niqe_modelparameters.mat", _HF + "niqe_modelparameters.mat"),)),
    MetricSpec(name="brisque", pyiqa_name="brisque", needs_reference=False, lower_better=True,
               files=(("pyiqa/brisque_svm_weights.pth", _HF + "brisque_svm_weights.pth"),)),
)}
PAPER_METRICS = ("psnr", "ssim", "lpips", "maniqa-pipal", "clipiqa", "musiq")
OFFLINE_METRICS = ("psnr", "ssim", "piqe")  # need no weight files
# The SHA-256 a cache file must have (path inside the cache -> hex digest), checked with the other files
# before anything starts and again when CLIP loads: OpenAI's CLIP files carry theirs in their URL, and
# pyiqa's loader would download a file that does not match. (Tests register the digest of their random file.)
FILE_SHA256: dict[str, str] = {"clip/RN50.pt": _CLIP_RN50_SHA}


class MissingWeightsError(FileNotFoundError):
    """Weight files a metric needs are not in the metric cache."""


class MissingDependencyError(ImportError):
    """A Python module a metric's pyiqa arch imports is not importable."""


class MetricValue(NamedTuple):
    metric: str
    value: float  # NaN when the metric failed on this image
    seconds: float
    error: str


def get_spec(name: str) -> MetricSpec:
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return METRICS[name]


def parse_metrics(text: str) -> tuple[str, ...]:
    """``"psnr,ssim, musiq"`` -> ``("psnr", "ssim", "musiq")``, each checked against :data:`METRICS`."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        get_spec(name)
    return names


def resolve_cache_dir(cache_dir: str | None = None) -> str:
    """The metric cache folder: the argument, else ``$PATCHSCALER_IQA_CACHE``, else torch hub's folder."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or torch.hub.get_dir()
    return os.path.abspath(os.path.expanduser(chosen))


def missing_files(names: Sequence[str], cache_dir: str) -> dict[str, list[tuple[str, str]]]:
    """Per metric, the (absolute path, source URL) of every needed file that is absent."""
    out: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        absent = [(os.path.join(cache_dir, rel), url) for rel, url in get_spec(name).files
                  if not os.path.isfile(os.path.join(cache_dir, rel))]
        if absent:
            out[name] = absent
    return out


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> SHA-256: each file is hashed once


def file_sha256(path: str) -> str:
    """The hex SHA-256 of a file, read in chunks and remembered while the file is unchanged."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _wrong_hash_message(path: str, digest: str, expected: str, url: str) -> str:
    return f"{path} has SHA-256 {digest}, expected {expected}; replace it with the file from {url}"


def wrong_hashes(names: Sequence[str], cache_dir: str) -> list[str]:
    """One message per present file of ``names`` whose SHA-256 is not the one in :data:`FILE_SHA256`."""
    out = []
    for name in names:
        for rel, url in get_spec(name).files:
            path, expected = os.path.join(cache_dir, rel), FILE_SHA256.get(rel)
            if expected and os.path.isfile(path) and (digest := file_sha256(path)) != expected:
                out.append(f"  {name}: " + _wrong_hash_message(path, digest, expected, url))
    return out


def check_weights(names: Sequence[str], cache_dir: str) -> None:
    """Raise :class:`MissingWeightsError` naming every absent file of every metric in ``names`` (or, when
    all are there, every file with the wrong SHA-256), and :class:`MissingDependencyError` when a metric's
    Python module does not import."""
    absent = missing_files(names, cache_dir)
    if absent:
        lines = [f"metric weights missing from the metric cache {cache_dir}:"]
        for name, files in absent.items():
            for path, url in files:
                lines.append(f"  {name}: {path}\n      (download: {url})")
        lines.append(f"Put the files there (the folder is --metric-cache or ${CACHE_ENV}; its layout is "
                     "torch hub's: pyiqa/, checkpoints/, clip/; see docs/evaluation.md), or leave these "
                     f"metrics out (--metrics {','.join(OFFLINE_METRICS)} needs no weights).")
        raise MissingWeightsError("\n".join(lines))
    wrong = wrong_hashes(names, cache_dir)
    if wrong:
        raise MissingWeightsError("\n".join([f"wrong metric weights in the metric cache {cache_dir}:",
                                             *wrong]))
    for name in names:
        for module in get_spec(name).modules:
            try:
                with warnings.catch_warnings():  # `clip` warns that pkg_resources is deprecated
                    warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
                    importlib.import_module(module)
            except ImportError as exc:
                raise MissingDependencyError(
                    f"metric {name!r} needs the Python module {module!r}, which does not import: {exc}. "
                    "(OpenAI's `clip` package imports `pkg_resources`: install setuptools<81.)") from exc


def _local_clip_download(cache_dir: str) -> Callable[[str, str], str]:
    """A stand-in for ``pyiqa.archs.clip_model._download`` that only reads the cache: the file must have
    the SHA-256 of :data:`FILE_SHA256`, else the one in its URL (as pyiqa's own check)."""

    def download(url: str, root: str) -> str:
        rel = "clip/" + os.path.basename(url)
        path = os.path.join(cache_dir, rel)
        if not os.path.isfile(path):
            raise MissingWeightsError(f"{path} is missing from the metric cache; download it from {url}")
        expected = FILE_SHA256.get(rel, url.split("/")[-2])
        digest = file_sha256(path)
        if digest != expected:
            raise MissingWeightsError(_wrong_hash_message(path, digest, expected, url))
        return path
    return download


@contextlib.contextmanager
def offline_cache(cache_dir: str, *, spec: MetricSpec) -> Iterator[None]:
    """While building ``spec``'s pyiqa metric: point pyiqa and torch hub at ``cache_dir``, make every
    download raise, and (``backbone_in_checkpoint``) build timm backbones without ImageNet weights, since
    the metric's own checkpoint overwrites them. Everything is restored on exit."""
    import pyiqa.utils.download_util as pyiqa_dl
    import timm

    def refuse(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
        raise MissingWeightsError(f"{spec.name}: pyiqa asked to download {url} to {dst}; this project never "
                                  f"downloads at run time: put the file at {dst} (docs/evaluation.md)")

    create_model = timm.create_model

    def create_model_no_download(*args: Any, **kwargs: Any) -> torch.nn.Module:
        return create_model(*args, **{**kwargs, "pretrained": False})

    saved = (torch.hub.get_dir(), pyiqa_dl.DEFAULT_CACHE_DIR, pyiqa_dl.download_url_to_file,
             torch.hub.download_url_to_file)
    clip_module = importlib.import_module("pyiqa.archs.clip_model") if spec.modules else None
    clip_download = clip_module._download if clip_module else None
    torch.hub.set_dir(cache_dir)
    pyiqa_dl.DEFAULT_CACHE_DIR = os.path.join(cache_dir, "pyiqa")
    pyiqa_dl.download_url_to_file = refuse
    torch.hub.download_url_to_file = refuse
    if spec.backbone_in_checkpoint:
        timm.create_model = create_model_no_download
    if clip_module is not None:
        clip_module._download = _local_clip_download(cache_dir)
    try:
        yield
    finally:
        torch.hub.set_dir(saved[0])
        pyiqa_dl.DEFAULT_CACHE_DIR, pyiqa_dl.download_url_to_file, torch.hub.download_url_to_file = saved[1:]
        timm.create_model = create_model
        if clip_module is not None:
            clip_module._download = clip_download


def create_metric(name: str, *, cache_dir: str | None = None, device: str = "cpu",
                  crop_border: int = 0) -> torch.nn.Module:
    """Build one pyiqa metric from the local cache (files checked first), on ``device``, in eval mode."""
    import pyiqa

    spec = get_spec(name)
    cache = resolve_cache_dir(cache_dir)
    check_weights([name], cache)
    options = dict(spec.options)
    if spec.crop_border:
        options["crop_border"] = int(crop_border)
    with offline_cache(cache, spec=spec):
        metric = pyiqa.create_metric(spec.pyiqa_name, device=torch.device(device), **options)
    return metric.eval()


def installed_version(distribution: str = "pyiqa") -> str:
    """The installed version of a distribution (``importlib.metadata``), ``""`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return ""


class SizeMismatchError(ValueError):
    """The upscaled image and its reference differ by more than rounding."""


def common_crop(sr: torch.Tensor, hr: torch.Tensor, *, slack: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left crop of both images to their common size when they differ by at most ``slack`` pixels per
    side (an HR that is not a multiple of the scale ``s`` is up to ``s - 1`` pixels larger than the ×s
    output); a larger difference is a :class:`SizeMismatchError`, never a silent crop."""
    (sh, sw), (hh, hw) = sr.shape[-2:], hr.shape[-2:]
    if abs(sh - hh) > slack or abs(sw - hw) > slack:
        raise SizeMismatchError(f"SR is {sh}x{sw} but HR is {hh}x{hw} (more than {slack} px apart: wrong "
                                "pairing or wrong scale?)")
    h, w = min(sh, hh), min(sw, hw)
    return sr[..., :h, :w], hr[..., :h, :w]


class MetricScorer:
    """The metric models of one worker; ``score`` runs every metric on one image.

    ``seed`` re-seeds torch before every metric call, so metrics that crop at random give the same value
    for an image whatever else the worker scored before it. ``size_slack``: how many pixels per side the
    SR and HR images may differ (the scale minus one); more is an error on that image."""

    def __init__(self, *, metrics: Sequence[str], cache_dir: str | None = None, device: str = "cpu",
                 seed: int = 0, crop_border: int = 4, size_slack: int = 3) -> None:
        self.specs = [get_spec(m) for m in metrics]
        self.cache_dir = resolve_cache_dir(cache_dir)
        check_weights([s.name for s in self.specs], self.cache_dir)  # all missing files in one error
        self.device = device
        self.seed = seed
        self.crop_border = crop_border
        self.size_slack = size_slack
        self.models = {s.name: create_metric(s.name, cache_dir=self.cache_dir, device=device,
                                             crop_border=crop_border) for s in self.specs}

    def _fits(self, spec: MetricSpec, image: torch.Tensor) -> bool:
        border = 2 * self.crop_border if spec.crop_border else 0
        return min(image.shape[-2:]) - border >= 8  # SSIM's 11x11 window needs a little room too

    @torch.no_grad()
    def score(self, sr: torch.Tensor, hr: torch.Tensor | None = None) -> list[MetricValue]:
        """``sr`` / ``hr``: (3, H, W) in [0, 1]. Full-reference metrics are skipped without ``hr``; a metric
        that fails on this image gives NaN and its error, the others still run."""
        out = []
        for spec in self.specs:
            if spec.needs_reference and hr is None:
                continue
            start = time.perf_counter()
            try:
                x = sr[None].to(self.device).clamp(0, 1)  # (1, 3, H, W)
                if spec.needs_reference:
                    x, ref = common_crop(x, hr[None].to(self.device).clamp(0, 1), slack=self.size_slack)
                    if not self._fits(spec, x):
                        size = tuple(x.shape[-2:])
                        raise ValueError(f"image {size} too small for border {self.crop_border}")
                    torch.manual_seed(self.seed)
                    value = self.models[spec.name](x, ref)
                else:
                    torch.manual_seed(self.seed)
                    value = self.models[spec.name](x)
                value, error = float(value.flatten()[0]), ""
            except Exception as exc:  # one image or metric must not stop the others
                value, error = math.nan, f"{type(exc).__name__}: {exc}"
            out.append(MetricValue(spec.name, value, time.perf_counter() - start, error))
        return out
