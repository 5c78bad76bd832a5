"""Output naming (``pipeline/naming.py`` through ``io.plan_outputs``) and listing (``io.list_files``):
one output per input whatever the names — case, NFC/NFD, double slashes, trailing dots, extensions —
never outside the output root, the common case unchanged; keys neither lost nor merged."""

from __future__ import annotations

import posixpath
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import schema as S
from pipeline.io import list_files, plan_outputs, read_bytes, refusal, write_bytes_atomic
from pipeline.naming import RESERVED, fold
from pipeline.stages import ReadStage

NFC, NFD = unicodedata.normalize("NFC", "é"), unicodedata.normalize("NFD", "é")
# name parts chosen to collide: case, Unicode forms, the Kelvin sign (folds to k), ß/ss, trailing dots and
# spaces, extensions, reserved folders, hash-like suffixes, path operators
STEMS = ["a", "A", "b", NFC, NFD, "K", "\u212a", "ß", "ss", "a.", "a ", "x~1", "_maps", "d.png",
         "..", ".", ""]
EXTS = ["", ".png", ".PNG", ".jpg", ".png.png", ".", ".webp", ".png."]
ROOTS = [("/data/in", "/data/out"), ("s3://bucket/in", "s3://bucket/out")]

segment = st.builds(lambda stem, ext: stem + ext, st.sampled_from(STEMS), st.sampled_from(EXTS))
relative_name = st.lists(segment, min_size=1, max_size=3).map("/".join)


def _pretty(rel: str, ext: str) -> str | None:
    """What a lone input should be called: its path without empty or '.' segments, new extension."""
    segs = [s for s in rel.split("/") if s not in ("", ".")]
    if not segs or rel.endswith("/") or any(not s.strip(".") for s in segs):
        return None
    if len(segs) > 1 and fold(segs[0]) in {fold(r) for r in RESERVED}:
        return None  # renamed (~), checked by the example test
    return "/".join([*segs[:-1], posixpath.splitext(segs[-1])[0] + "." + ext])


@settings(max_examples=400, deadline=None)
@given(rels=st.sets(relative_name, min_size=1, max_size=14), ext=st.sampled_from(["png", "jpg", "webp"]),
       roots=st.sampled_from(ROOTS), seed=st.integers(0, 2**16))
def test_plan_outputs_is_injective_safe_and_keeps_pretty_names(rels, ext, roots, seed) -> None:
    in_root, out_root = roots
    sources = [f"{in_root}/{r}" for r in rels]
    plan = plan_outputs(sources, in_root, out_root, ext)
    assert set(plan) == set(sources)  # every input is planned: an output or a refusal

    shuffled = sources[:]
    random.Random(seed).shuffle(shuffled)
    assert plan_outputs(shuffled, in_root, out_root, ext) == plan  # the set decides, not the order

    accepted = {s: o for s, o in plan.items() if refusal(o) is None}
    for source, output in plan.items():
        rel = source[len(in_root) + 1:]
        if ".." in rel.split("/"):
            assert source not in accepted  # refused, explicitly (a reason, not a silent drop)
        assert (source in accepted) == (_pretty(rel, ext) is not None or _reserved_first(rel)), (rel, output)
    files = []
    for output in accepted.values():  # inside the output root, no path operators, the new extension
        assert output.startswith(out_root + "/") and output.endswith("." + ext)
        rest = output[len(out_root) + 1:].split("/")
        assert all(seg not in ("", ".", "..") and seg.strip(".") for seg in rest)
        assert posixpath.normpath("/" + "/".join(rest)) == "/" + "/".join(rest)
        files.append(fold(output))
    # injective even where names differ only by case, Unicode form or trailing dots/spaces
    assert len(set(files)) == len(files)
    folders = {fold(o.rsplit("/", i)[0]) for o in accepted.values() for i in range(1, o.count("/"))}
    assert not folders & set(files)  # no output file has the name of an output folder

    wanted: dict[str, int] = {}
    for source in accepted:
        pretty = _pretty(source[len(in_root) + 1:], ext)
        if pretty:
            wanted[fold(pretty)] = wanted.get(fold(pretty), 0) + 1
    for source, output in accepted.items():  # a name nobody else wants is kept as it is
        pretty = _pretty(source[len(in_root) + 1:], ext)
        if pretty and wanted[fold(pretty)] == 1 and fold(f"{out_root}/{pretty}") not in folders:
            assert output == f"{out_root}/{pretty}"


def _reserved_first(rel: str) -> bool:
    segs = [s for s in rel.split("/") if s not in ("", ".")]
    return (len(segs) > 1 and fold(segs[0]) in {fold(r) for r in RESERVED} and not rel.endswith("/")
            and all(s.strip(".") for s in segs))


def test_the_collisions_of_the_issue_and_refusals() -> None:
    local = plan_outputs(["/in/a.png", "/in/a.jpg", "/in/a.png.png", "/in/sub/b.jpg"], "/in", "/out", "png")
    assert local["/in/sub/b.jpg"] == "/out/sub/b.png"  # the common case is untouched
    assert local["/in/a.png"] == "/out/a.png" and local["/in/a.png.png"] == "/out/a.png.png"
    assert local["/in/a.jpg"] == "/out/a.jpg.png"
    s3 = plan_outputs(["s3://b/in//x.png", "s3://b/in/x.png", "s3://b/in/../../x.png", "s3://b/in/_maps/m.png"],
                      "s3://b/in", "s3://b/out", "png")
    assert s3["s3://b/in/x.png"] == "s3://b/out/x.png"
    assert s3["s3://b/in//x.png"] not in (s3["s3://b/in/x.png"], None)
    assert s3["s3://b/in/_maps/m.png"] == "s3://b/out/_maps~/m.png"  # never in the root's own folders
    assert "'..'" in refusal(s3["s3://b/in/../../x.png"])
    outside = plan_outputs(["/in/../etc/passwd", "/elsewhere/x.png"], "/in", "/out", "png")
    assert all(refusal(o) for o in outside.values())
    names = [f"/in/caf{NFC}.png", f"/in/caf{NFD}.png", "/in/Q.png", "/in/q.png"]
    unicode = plan_outputs(names, "/in", "/o", "png")
    assert len({fold(o) for o in unicode.values()}) == 4


def test_a_refused_input_is_an_error_row_naming_it_and_is_not_read() -> None:
    source = "s3://b/in/../../x.png"
    meta = S.new_meta(source=source, output=plan_outputs([source], "s3://b/in", "s3://b/o", "png")[source])
    assert meta["status"] == "error" and meta["output"] == ""
    assert meta["error"].startswith(f"plan: {source}: UnsafeOutput: ")
    assert "outside the output folder" in meta["error"]
    batch = {S.IMAGE_ID: S.object_column(["x"]), S.META: S.object_column([S.dump_meta(meta)])}
    out = ReadStage(storage_options={})(batch)  # no S3 is reachable here: it must not even try
    assert S.load_meta(out[S.META][0])["error"] == meta["error"] and out[S.DATA][0] == b""


def test_local_names_that_differ_only_by_case_or_unicode_form_keep_their_own_outputs(tmp_path: Path) -> None:
    """On a case-sensitive disk: list, plan, write every output, read each back: no output overwrote
    another, and outputs would stay apart on a case-insensitive or normalising disk too."""
    root = tmp_path / "in"
    names = [f"caf{NFC}.png", f"caf{NFD}.png", "Photo.png", "photo.png", "photo.PNG", "photo.jpg",
             "photo.png.png", "d.png/e.jpg", "d.jpg", "t.png.", "t.png", ".hidden.png", "sub/.hid/x.png",
             "_maps/m.png"]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(f"content {i}".encode())
    assert len(list(root.rglob("*.*"))) >= len(names)  # the disk keeps them apart
    sources = list_files(str(root), {})
    visible = [n for n in names if not any(p.startswith(".") for p in n.split("/"))]
    assert sorted(sources) == sorted(str(root / n) for n in visible)  # nothing lost, nothing merged
    plan = plan_outputs(sources, str(root), str(tmp_path / "out"), "png")
    assert len({fold(o) for o in plan.values()}) == len(sources)
    for source, output in plan.items():
        write_bytes_atomic(output, read_bytes(source, {}), {})
    for source, output in plan.items():
        assert Path(output).read_bytes() == Path(source).read_bytes(), (source, output)
    assert len([p for p in (tmp_path / "out").rglob("*") if p.is_file()]) == len(sources)


@pytest.mark.timeout(120)
def test_s3_listing_keeps_every_key(tmp_path: Path) -> None:
    """Keys that differ by double slashes, ``.``/``..`` segments, case or Unicode form are all listed
    (hidden keys and folder markers excepted) and each gets its own output or an explicit refusal."""
    import boto3
    from s3util import moto_s3

    keys = ["in//x.png", "in/x.png", "in///x.png", "in/./x.png", "in/../../x.png", "in/A.png", "in/a.png",
            f"in/{NFC}.png", f"in/{NFD}.png", "in/t.png.", "in/sub//w.png", "in/.hid.png", "in/d/"]
    with moto_s3("naming-bucket") as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for key in keys:
            s3.put_object(Bucket="naming-bucket", Key=key, Body=key.encode())
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        sources = list_files("s3://naming-bucket/in", options)
        expected = [k for k in keys if not k.endswith("/") and ".hid" not in k]
        assert sorted(sources) == sorted(f"s3://naming-bucket/{k}" for k in expected)
        for source in sources:  # each URI reads its own object
            assert read_bytes(source, options) == source[len("s3://naming-bucket/"):].encode()
        plan = plan_outputs(sources, "s3://naming-bucket/in", "s3://naming-bucket/out", "png")
        refused = [s for s, o in plan.items() if refusal(o)]
        assert refused == ["s3://naming-bucket/in/../../x.png"]
        accepted = [o for o in plan.values() if not refusal(o)]
        assert len(set(map(fold, accepted))) == len(accepted) == len(sources) - 1
        for source, output in plan.items():
            if not refusal(output):
                write_bytes_atomic(output, read_bytes(source, options), options)
        for source, output in plan.items():
            if not refusal(output):
                assert read_bytes(output, options) == read_bytes(source, options)
    assert np.all([o.startswith("s3://naming-bucket/out/") for o in accepted])
