"""Samples: the `Item` every input becomes, and webdataset's rules for grouping files into samples.

webdataset's rules, exactly (`webdataset.tariterators.base_plus_ext` and `group_by_keys`): a member's key is
its name up to the first dot of its base name (the directory part kept), its field the rest, lower-cased
(`dir/photo.v2.JPG` -> key `dir/photo`, field `v2.jpg`); a name is taken as written, so `./a.jpg` (as
`tar -C dir .` writes it) is key `./a` for webdataset and pe-jax alike; consecutive members sharing a key are
one sample; names without a dot, and webdataset's `__meta__` names, are no sample's. Where webdataset would
yield two samples of one key (members not adjacent) or raise (a field twice in one sample), pe-jax records
the sample as a failure instead of merging it or stopping the job. A sample's image is the field whose last part is an
image extension (`jpg jpeg png webp bmp tif tiff gif`, any case); `txt` is its caption (or a text input),
`cls` its label, `json` its top-level fields as carried columns. A json field named like one of the job's
own columns (`COLUMNS`) is carried as `json_NAME`; the sample's other members (a second image, unknown
fields) are named in the `other_members` column, so nothing a shard carries is dropped unseen. Members that
are no regular file (links, devices: webdataset skips them) are failures of their own, never skipped silently.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pe_jax.errors import InputError
from pe_jax.preprocess.image import ByteRange

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
IMAGE_EXTS = tuple(f".{e}" for e in IMAGE_FIELDS)  # a folder's image files
SIDECAR_FIELDS = ("txt", "cls", "json")  # caption (or text), label, carried fields
SIDECAR_EXTS = tuple(f".{e}" for e in SIDECAR_FIELDS)
OTHER = "other_members"
# The job's own metadata columns: a json field of one of these names is carried as json_NAME.
COLUMNS = frozenset({"key", "source", "caption", "text", "label", "extra", "json", OTHER})
MAX_SIDECAR_BYTES = 1 << 20  # a caption or label larger than this is not one

_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


@dataclass(frozen=True)
class Item:
    key: str
    source: str  # a path, "shard.tar::member" or "list.jsonl:ROW"
    location: ByteRange | None = None  # where a tar member's bytes are
    text: str | None = None  # a text input, or an image's caption
    label: str | None = None  # a class name
    extra: dict = field(default_factory=dict)  # carried columns
    error: str | None = None  # why the listing already knows this input fails (recorded as its failure)
    sidecars: tuple = ()  # the sidecar fields (txt, cls, json) grouped with it

    @property
    def data(self):
        """What `pe_jax.preprocess.image.decode_image` reads: a path or a byte range."""
        return self.location or self.source


def split_name(name: str) -> tuple[str | None, str | None]:
    """webdataset's (key, field) of a member name, the field lower-cased; (None, None) for a name without one.

    Args:
        name: a tar member's name.

    Example:
        >>> split_name("dir/photo.v2.JPG")
        ('dir/photo', 'v2.jpg')
    """
    m = _NAME.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def is_image_field(name: str) -> bool:
    """Whether a field (`jpg`, `v2.jpg`, `seg.PNG`) is an image: its last part is an image extension.

    Args:
        name: a sample's field.

    Example:
        >>> is_image_field("v2.JPG"), is_image_field("json")
        (True, False)
    """
    return name.rsplit(".", 1)[-1].lower() in IMAGE_FIELDS


def skipped_by_webdataset(name: str) -> bool:
    """webdataset's metadata names (`__meta__`, `__index__/...`): no sample's members, skipped by both.

    Args:
        name: a tar member's name.

    Example:
        >>> skipped_by_webdataset("__index__"), skipped_by_webdataset("a.jpg")
        (True, False)
    """
    return bool(_META.match(name)) or ("/" not in name and name.startswith("__") and name.endswith("__"))


@dataclass
class Group:
    """One sample's members: `fields` maps each field to its member (whatever the caller grouped)."""

    key: str
    first: str  # the first member's name
    fields: dict = field(default_factory=dict)
    error: str | None = None


def group_members(members: Iterable[tuple[str, Any]],
                  refused: Callable[[Any], str | None] = lambda member: None) -> Iterator[Group]:
    """webdataset's grouping of (name, member) pairs in tar order into samples (see the module docstring);
    groups that webdataset would not yield as one valid sample carry an `error`.

    Args:
        members: (member name, anything) for each member of a shard, in order.
        refused: member -> why it is no sample's member (a link, a device: webdataset skips those), or None.
            A refused member is a failure of its own, met where it is; it does not end the sample around it.

    Example:
        >>> [(g.key, list(g.fields)) for g in group_members([("a.jpg", 0), ("a.txt", 1), ("b.v2.png", 2)])]
        [('a', ['jpg', 'txt']), ('b', ['v2.png'])]
    """
    seen, current = set(), None
    for name, member in members:
        if skipped_by_webdataset(name):
            continue
        key, ext = split_name(name)
        why = refused(member)
        if why is not None:  # webdataset skips it silently; pe-jax records it
            yield Group(key or name, name, error=f"{name}: {why}")
            continue
        if key is None:  # webdataset skips it silently; pe-jax records it
            yield Group(name, name, error=f"{name}: a member name without an extension belongs to no sample")
            continue
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = Group(key, name)
            if key in seen:
                current.error = (f"key {key!r} again after other samples: its members are not adjacent "
                                 "(webdataset would yield a second sample of the same key)")
            seen.add(key)
        if ext in current.fields:
            current.error = current.error or (f"{name}: field {ext!r} twice in sample {key!r} (webdataset raises "
                                              "on a duplicate file name)")
            continue
        current.fields[ext] = member
    if current is not None:
        yield current


def image_field(fields: Iterable[str]) -> str | None:
    """The field embedded as the sample's image: a plain image extension first (`jpg` over `seg.png`), else the
    first whose last part is one; None when no field is an image.

    Args:
        fields: the sample's fields, in member order.

    Example:
        >>> image_field(["seg.png", "jpg", "txt"]), image_field(["txt"])
        ('jpg', None)
    """
    fields = list(fields)
    return next((f for f in fields if f in IMAGE_FIELDS), None) or next(filter(is_image_field, fields), None)


def sample_item(group: Group, source: Callable[[str], str], read: Callable[[str], str], modality: str,
                location: Callable[[str], ByteRange | None] = lambda f: None) -> Item:
    """The `Item` of one sample: its image (or, for text, its `txt`), sidecars read with `read(field)` (a
    sidecar that cannot be one makes the sample a failure), other members named in `other_members`.

    Args:
        group: the sample (`group_members`).
        source: field -> the item's source string (`shard.tar::member`, a path).
        read: field -> the sidecar's text.
        modality: "text" embeds the `txt` field; otherwise the image field.
        location: field -> the image's byte range (tar shards), or None (a path); ValueError where there is
            none to read (a sparse member): the sample's failure.

    Example:
        >>> g = Group("a", "a.jpg", {"jpg": "a.jpg", "txt": "a.txt"})
        >>> sample_item(g, lambda f: g.fields[f], lambda f: "a cat", "image").text
        'a cat'
    """
    fields = group.fields
    if group.error:
        return Item(group.key, source(next(iter(fields))) if fields else group.first, error=group.error)
    main = "txt" if modality == "text" else image_field(fields)
    if main not in fields:
        what = "no .txt member (the text to embed)" if modality == "text" else "no image member"
        return Item(group.key, source(next(iter(fields))), error=f"{what}; its fields: {', '.join(fields)}")
    sidecars = tuple(f for f in SIDECAR_FIELDS if f in fields)
    try:
        side = {f: read(f) for f in sidecars}
        where = location(main) if modality != "text" else None
    except (ValueError, OSError) as e:  # an oversized or unreadable sidecar, an unreadable image: its failure
        return Item(group.key, source(main), error=str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
    extra = json_fields(side["json"]) if "json" in side else {}
    others = [source(f).rsplit("::", 1)[-1] for f in fields if f != main and f not in side]
    if others:
        extra[OTHER] = others
    return Item(group.key, source(main), where, text=side.get("txt"), label=side.get("cls"), extra=extra,
                sidecars=sidecars)


def sidecar_text(name: str, size: int, data: Callable[[], bytes]) -> str:
    """A sidecar's text (UTF-8, stripped); one over `MAX_SIDECAR_BYTES` is an error naming it.

    Args:
        name: what to name in the error (`shard.tar::a.txt`, a path).
        size: its size in bytes.
        data: reads its bytes (called only when the size is acceptable).

    Example:
        >>> sidecar_text("a.txt", 7, lambda: b" a cat ")
        'a cat'
    """
    if size > MAX_SIDECAR_BYTES:
        raise InputError(f"{name}: {size} bytes is too large for a sidecar")
    return data().decode("utf-8", errors="replace").strip()


def json_fields(text: str) -> dict:
    """A `.json` sidecar's top-level fields, nested values as JSON text; a field named like a job column
    (`COLUMNS`) is prefixed `json_` (again while the json has a field of that name too: `key` beside
    `json_key` is `json_json_key`). One that is not a JSON object (or nests deeper than Python's parser goes)
    is kept whole, as the `json` column, rather than lost; an integer no 64-bit column holds is kept as its
    text (`json_int`).

    Args:
        text: the sidecar's text.

    Example:
        >>> json_fields('{"key": 7, "url": "http://x", "exif": {"a": 1}}')
        {'json_key': 7, 'url': 'http://x', 'exif': '{"a": 1}'}
    """
    try:
        value = json.loads(text, parse_int=json_int)
        if not isinstance(value, dict):
            return {"json": text}
        out = {}
        for k, v in value.items():
            name = k
            while name in COLUMNS or (name != k and (name in value or name in out)):  # the json's own names stay
                name = f"json_{name}"
            out[name] = json.dumps(v) if isinstance(v, (dict, list)) else v
        return out
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return {"json": text}


def json_int(digits: str) -> int | str:
    """A JSON integer as `json.loads(parse_int=json_int)` gives it: an int where a 64-bit parquet column holds
    it, else its text (a larger one stopped the metadata write with a traceback).

    Args:
        digits: the integer as written in the JSON.

    Example:
        >>> json_int("-5"), json_int("123456789012345678901234567890")
        (-5, '123456789012345678901234567890')
    """
    value = int(digits) if len(digits) <= 20 else None  # never parse a 1 MB integer (Python refuses those too)
    return value if value is not None and -(1 << 63) <= value < 1 << 63 else digits


def folder_groups(rels: list[str], folders: Iterable[str] = ()) -> dict[str, Group | None]:
    """img2dataset's `files` layout among a folder's files: files sharing a stem (the name without its last
    extension) where one is an image and every other a sidecar (`.txt`, `.json`, `.cls`) are one sample, keyed
    by the stem. Every other file is a sample of its own (no fields), keyed by its path without the extension,
    with it where two files share a stem. img2dataset's records beside its folder `X` (`X.parquet`,
    `X_stats.json`) are no inputs.

    Args:
        rels: the files' paths relative to the input folder.
        folders: the input's sub-folders, relative alike (where img2dataset's records sit beside).

    Returns:
        each of `rels` -> its sample's Group (fields -> relative path) at the image, None at a sidecar (and at
        img2dataset's records).

    Example:
        >>> g = folder_groups(["0/1.jpg", "0/1.json", "0/1.txt", "0/2.png"])
        >>> g["0/1.jpg"].fields, g["0/1.txt"], g["0/2.png"].key
        ({'jpg': '0/1.jpg', 'json': '0/1.json', 'txt': '0/1.txt'}, None, '0/2')
    """
    stems = collections.defaultdict(list)
    for rel in rels:
        stems[os.path.splitext(rel)[0]].append(rel)
    out = {}
    for stem, names in stems.items():
        if len(names) == 1:  # the common case: a lone file
            out[names[0]] = Group(stem, names[0])
            continue
        exts = [os.path.splitext(r)[1].lower() for r in names]
        images = [r for r, e in zip(names, exts, strict=True) if e in IMAGE_EXTS]
        if len(names) > 1 and len(images) == 1 and all(e in SIDECAR_EXTS for e in exts if e not in IMAGE_EXTS):
            out.update(dict.fromkeys(names))
            out[images[0]] = Group(stem, images[0], {e[1:]: r for r, e in zip(names, exts, strict=True)})
        else:
            out.update({r: Group(r if len(names) > 1 else stem, r) for r in names})
    for folder in folders:
        for record in (f"{folder}.parquet", f"{folder}_stats.json"):
            if record in out:
                out[record] = None
    return out
