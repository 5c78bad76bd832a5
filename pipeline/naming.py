"""Output names: one per input, never shared by two inputs, never outside the output folder.

``output_names`` maps each input's path under the input root to a path under the output root with the
output extension. The common case keeps the input's path: ``a/b.jpg`` -> ``a/b.png``.

**No two inputs share an output**, not even on a file system that confuses names: two outputs never
differ only in letter case, in Unicode normalisation (NFC ``é`` vs NFD ``e`` + combining accent) or in
trailing dots and spaces of a name (which Windows drops). Decision: such inputs (e.g. the NFC and the
NFD spelling of ``café.png``) are *distinct* files — S3 and Linux keep them apart — so each gets its own
output; none is refused. An output file never has the name of an output folder either (``a.jpg`` does
not become ``a.png`` when there is an input folder ``a.png/``).

When several inputs want one name (their ``fold`` is equal), names are tried in this order, and a name is
given only to an input that is alone in wanting it and finds it free:

1. the input's path with the new extension: ``a.jpg`` -> ``a.png`` (if exactly one of the contenders
   already has this very name, ``a.png`` for ``a.png``, it keeps it);
2. the whole name plus the new extension: ``a.jpg`` -> ``a.jpg.png``;
3. the stem plus ``~`` and 8 hex digits of the SHA-256 of the input's exact relative path:
   ``a~1f3e9c2b.png`` (the exact path: ``in//x.png`` and ``in/x.png`` get different digits);
4. that name plus ``~2``, ``~3``, ... in the inputs' sorted order, until one is free (never needed in
   practice; it makes the mapping injective by construction).

The plan depends only on the set of inputs (not on their order). Adding an input that collides with an
earlier one can rename the earlier one's output, which the next run then redoes.

**Refused names.** A ``..`` segment, or a segment of dots only, would resolve outside (or onto) a folder of
the output root: such an input is refused (``UnsafeName``) and becomes an error row naming it — it is not
silently dropped. Empty segments (``in//x.png``) and ``.`` segments are left out of the output path (and
then the rules above keep it apart from ``in/x.png``). The output root's own entries (``_manifest/``,
``_maps/``, ``_scores/``, ``manifest.parquet``, ``scores.parquet``) are never used for an input's
folder: a first folder of that name gets a ``~`` appended (``_maps/x.png`` -> ``_maps~/x.png``).
"""

from __future__ import annotations

import hashlib
import posixpath
import unicodedata
from collections.abc import Iterable
from typing import Any

RESERVED = ("_manifest", "_maps", "_scores", "_jobplan", "manifest.parquet", "scores.parquet")
HASH_DIGITS = 8


class UnsafeName(ValueError):
    """An input whose name cannot be mapped to an output inside the output root."""


def fold(path: str) -> str:
    """The form in which file systems may confuse two names: Unicode canonical caseless form (NFD of the
    case-folded NFD), each segment without trailing dots and spaces."""
    if path.isascii():  # the common case, without Unicode normalisation: the same result
        return "/".join([seg.rstrip(". ") for seg in path.lower().split("/")])
    folded = unicodedata.normalize("NFD", unicodedata.normalize("NFD", path).casefold())
    return "/".join(seg.rstrip(". ") for seg in folded.split("/"))


_RESERVED_FOLDED = {fold(r) for r in RESERVED}


def _segments(rel: str) -> list[str]:
    """The segments of an input's relative path that name its output: ``UnsafeName`` for ``..`` and
    dot-only segments; empty and ``.`` segments are left out."""
    segments = [s for s in rel.split("/") if s not in ("", ".")]
    for seg in segments:
        if seg == "..":
            raise UnsafeName("the '..' in its name would put its output outside the output folder")
        if not seg.strip("."):
            raise UnsafeName(f"{seg!r} in its name is not a usable file or folder name")
    if not segments or rel.endswith("/"):
        raise UnsafeName("its name ends in '/': a folder, not a file")
    if len(segments) > 1 and fold(segments[0]) in _RESERVED_FOLDED:
        segments[0] += "~"  # the output root's own folders and files are never an input's folder
    return segments


def _candidates(rel: str, segments: list[str], ext: str) -> list[str]:
    """Rules 1-3 of the module doc, best first (duplicates removed)."""
    folder, name = segments[:-1], segments[-1]
    stem = posixpath.splitext(name)[0]
    digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:HASH_DIGITS]
    names = [f"{stem}.{ext}", f"{name}.{ext}", f"{stem}~{digest}.{ext}"]
    out: list[str] = []
    for n in names:
        path = "/".join([*folder, n])
        if path not in out:
            out.append(path)
    return out


def first_name(rel: str, ext: str) -> str:
    """Rule 1's name of ``rel`` (what it gets unless another input wants it too); ``UnsafeName``."""
    segments = _segments(rel)
    return "/".join([*segments[:-1], f"{posixpath.splitext(segments[-1])[0]}.{ext}"])


def output_names(rels: dict[Any, str], ext: str, *, taken: Iterable[str] = ()) -> dict[Any, str | UnsafeName]:
    """``rels``: input id (e.g. its URI) -> its exact path under the input root, ``/``-separated, as
    found (double slashes, ``.`` segments and all). Returns input id -> its output path under the output
    root (``/``-separated, no empty, ``.`` or ``..`` segment), or the ``UnsafeName`` that refuses it.
    ``taken``: folded names already given to other inputs, or output folders of theirs
    (``pipeline/jobplan.py`` names the many inputs that want a name of their own without this)."""
    out: dict[Any, str | UnsafeName] = {}
    wishes: dict[str, list[str]] = {}
    for key, rel in rels.items():
        try:
            wishes[key] = _candidates(rel, _segments(rel), ext)
        except UnsafeName as exc:
            out[key] = exc
    taken = set(taken)  # the folded names given so far, and every output folder
    for names in wishes.values():
        parts = names[0].split("/")[:-1]
        taken.update(fold("/".join(parts[:i])) for i in range(1, len(parts) + 1))
    level = 0
    while wishes and level < 3:
        wanted: dict[str, list[str]] = {}
        for key, names in wishes.items():
            if level < len(names):
                wanted.setdefault(fold(names[level]), []).append(key)
        for folded, keys in wanted.items():
            if folded in taken:
                continue
            winner = keys[0] if len(keys) == 1 else None
            if winner is None:  # several want it: an input that already has this very name keeps it
                exact = [k for k in keys if rels[k] == wishes[k][level]]
                winner = exact[0] if len(exact) == 1 else None
            if winner is not None:
                out[winner] = wishes.pop(winner)[level]
                taken.add(folded)
        level += 1
    for key in sorted(wishes):  # rule 4: a counter after the hashed name, until a free one
        stem, ext_ = posixpath.splitext(wishes[key][-1])
        n = 2
        while fold(f"{stem}~{n}{ext_}") in taken:
            n += 1
        out[key] = f"{stem}~{n}{ext_}"
        taken.add(fold(out[key]))
    return out
