"""Texture sources of an RTM build: ``NAME=URI[:WEIGHT]`` on the command line, listed through fsspec.

A source is a local folder (or single file) or an ``s3://`` prefix, searched recursively. Every file found
is an input: files that are not images are not filtered out by extension but counted as bad input by
the probe (``crop.py``), so a stray ``README.txt`` shows up in the manifest instead of vanishing. Hidden
files and folders (``.name``) are left out, as in the pipeline.

The weight is everything after the last ``:`` when that parses as a positive number, so
``div2k=/data/div2k:2.0`` has weight 2 and ``tex=s3://bucket/dtd`` (whose only ``:`` belongs to the
scheme) has the default weight 1. A source's share of the candidate crops is its weight over the sum of
the weights of the sources in the same run (``crop.allocate``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.io import list_files, normalize_root

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Source:
    """One named texture source: ``uri`` is a local path (made absolute) or an ``s3://`` prefix."""

    name: str
    uri: str
    weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Source:
        return cls(name=str(data["name"]), uri=str(data["uri"]), weight=float(data["weight"]))


def _weight(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_source(text: str) -> Source:
    """``NAME=URI[:WEIGHT]`` -> ``Source``; ``ValueError`` with the expected form on bad input."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not rest.strip():
        raise ValueError(f"expected NAME=DIR_OR_S3[:WEIGHT], got {text!r}")
    if not NAME_PATTERN.match(name):
        raise ValueError(f"source name {name!r} must be letters, digits, '_', '.' or '-' (in {text!r})")
    uri, weight = rest.strip(), 1.0
    head, colon, tail = uri.rpartition(":")
    parsed = _weight(tail) if colon and head else None
    if parsed is not None:
        uri, weight = head, parsed
    if weight <= 0:
        raise ValueError(f"source weight must be positive, got {weight} in {text!r}")
    return Source(name=name, uri=normalize_root(uri), weight=weight)


def parse_sources(texts: Sequence[str]) -> list[Source]:
    """Parse several ``--source`` values; names must be unique."""
    return check_unique([parse_source(t) for t in texts])


def check_unique(sources: list[Source]) -> list[Source]:
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"source names must be unique, repeated: {duplicates}")
    return sources


def list_source_files(source: Source, storage_options: dict[str, Any]) -> list[str]:
    """Every (non-hidden) file of ``source``, sorted, as URIs of the source's kind."""
    return list_files(source.uri, storage_options)
