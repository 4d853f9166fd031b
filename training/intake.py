"""Dataset intake: a zip (or folder) of images and captions in, a clean normalised dataset out.

Nothing from the upload is trusted. Archive members are inspected before anything is read (names,
links, sizes, compression ratio), every image is decoded here with Pillow restricted to PNG/JPEG/WEBP
under a pixel cap, EXIF rotation is applied, and the result is re-encoded as PNG (which also drops
EXIF and other metadata). One bad file is reported by name and skipped; it never fails the dataset.
The report uses stable reason codes so the site can explain every skipped file.
"""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import imagehash
import numpy as np
from PIL import Image, ImageOps

from genserve.core.errors import InvalidRequest
from training.config import IntakeLimits

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp"})
CAPTION_EXTENSIONS = (".txt", ".caption")  # the first wins when both exist
PIL_FORMATS = ("PNG", "JPEG", "WEBP")
MANIFEST_NAME = "manifest.json"
EXIF_ORIENTATION = 0x0112
IMAGES_DIR = "images"


class Reason:
    """Stable codes for a skipped file."""

    UNSAFE_PATH = "unsafe_path"  # absolute, '..', or a drive/backslash path
    LINK = "link"  # symlink or other non-regular member
    SYSTEM_FILE = "system_file"  # __MACOSX, .DS_Store and other hidden files
    UNSUPPORTED_TYPE = "unsupported_type"
    FILE_TOO_LARGE = "file_too_large"
    COMPRESSION_RATIO = "compression_ratio"  # a zip bomb
    TOTAL_SIZE = "total_size_exceeded"
    CORRUPT_IMAGE = "corrupt_image"
    TOO_MANY_PIXELS = "too_many_pixels"
    IMAGE_TOO_SMALL = "image_too_small"
    DUPLICATE = "duplicate"
    IMAGE_LIMIT = "image_limit"
    ORPHAN_CAPTION = "orphan_caption"
    EXTRA_CAPTION = "extra_caption"  # both name.txt and name.caption: the .txt is used
    CAPTION_UNREADABLE = "caption_unreadable"


class Warn:
    """Stable codes for a dataset warning."""

    UNCAPTIONED = "uncaptioned"
    DOWNSCALED = "downscaled"
    EXIF_ROTATED = "exif_rotated"


@dataclass(frozen=True)
class KeptImage:
    name: str  # name in the upload
    file: str  # normalised PNG, relative to the dataset dir
    width: int
    height: int
    caption: str | None
    caption_file: str | None


@dataclass(frozen=True)
class SkippedFile:
    name: str
    reason: str
    detail: str = ""


@dataclass
class IntakeReport:
    images: list[KeptImage] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    warnings: dict[str, list[str]] = field(default_factory=dict)

    def warn(self, code: str, name: str) -> None:
        self.warnings.setdefault(code, []).append(name)

    def skip(self, name: str, reason: str, detail: str = "") -> None:
        self.skipped.append(SkippedFile(name, reason, detail))

    def to_dict(self) -> dict:
        return {
            "kept": len(self.images),
            "images": [asdict(i) for i in self.images],
            "skipped": [asdict(s) for s in sorted(self.skipped, key=lambda s: (s.name, s.reason))],
            "warnings": {code: sorted(names) for code, names in sorted(self.warnings.items())},
        }

    @classmethod
    def from_dict(cls, data: dict) -> IntakeReport:
        return cls(
            images=[KeptImage(**i) for i in data["images"]],
            skipped=[SkippedFile(**s) for s in data["skipped"]],
            warnings={k: list(v) for k, v in data["warnings"].items()},
        )


@dataclass(frozen=True)
class _Member:
    """One entry of the upload, before anything is read from it."""

    name: str
    size: int
    compressed: int
    read: Callable[[int], bytes]  # read(limit) -> at most `limit` + 1 bytes


def _unsafe_name(name: str) -> bool:
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":") or "\x00" in name:
        return True
    return ".." in PurePosixPath(name).parts


def _is_system(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p == "__MACOSX" or p.startswith(".") for p in parts) or parts[-1].lower() == "thumbs.db"


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidRequest(f"the dataset is not a readable zip file: {exc}", code="dataset_not_a_zip") from exc


def _zip_members(zf: zipfile.ZipFile, limits: IntakeLimits, report: IntakeReport) -> Iterator[_Member]:
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise InvalidRequest(
            f"the archive has {len(infos)} entries; at most {limits.max_members} are accepted",
            code="dataset_too_many_members",
        )
    total = 0
    for info in sorted(infos, key=lambda i: i.filename):
        name = info.filename
        if info.is_dir():
            continue
        file_type = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no Unix mode
        if _unsafe_name(name):
            report.skip(name, Reason.UNSAFE_PATH)
            continue
        if file_type and file_type != stat.S_IFREG:
            report.skip(name, Reason.LINK, "symlink" if file_type == stat.S_IFLNK else "not a regular file")
            continue
        if _is_system(name):
            report.skip(name, Reason.SYSTEM_FILE)
            continue
        if info.file_size > limits.max_file_bytes:
            report.skip(name, Reason.FILE_TOO_LARGE, f"{info.file_size} bytes")
            continue
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_compression_ratio:
            report.skip(name, Reason.COMPRESSION_RATIO, f"{ratio:.0f}x")
            continue
        total += info.file_size
        if total > limits.max_total_bytes:
            report.skip(name, Reason.TOTAL_SIZE)
            continue

        def read(limit: int, info: zipfile.ZipInfo = info) -> bytes:
            # the declared size bounds what zipfile yields; `limit` bounds it again
            with zf.open(info) as f:
                return f.read(limit + 1)

        yield _Member(name, info.file_size, info.compress_size, read)


def _folder_members(root: Path, limits: IntakeLimits, report: IntakeReport) -> Iterator[_Member]:
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for d in list(dirnames):
            if (base / d).is_symlink():
                report.skip((base / d).relative_to(root).as_posix(), Reason.LINK, "symlink")
                dirnames.remove(d)
        entries += [((base / f).relative_to(root).as_posix(), base / f) for f in filenames]
    if len(entries) > limits.max_members:
        raise InvalidRequest(
            f"the folder has {len(entries)} files; at most {limits.max_members} are accepted",
            code="dataset_too_many_members",
        )
    total = 0
    for name, path in sorted(entries):
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            report.skip(name, Reason.LINK, "symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file")
            continue
        if _is_system(name):
            report.skip(name, Reason.SYSTEM_FILE)
            continue
        if st.st_size > limits.max_file_bytes:
            report.skip(name, Reason.FILE_TOO_LARGE, f"{st.st_size} bytes")
            continue
        total += st.st_size
        if total > limits.max_total_bytes:
            report.skip(name, Reason.TOTAL_SIZE)
            continue

        def read(limit: int, path: Path = path) -> bytes:
            with open(path, "rb") as f:
                return f.read(limit + 1)

        yield _Member(name, st.st_size, st.st_size, read)


# ------------------------------------------------------------------------------------------ images


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def decode_image(data: bytes, limits: IntakeLimits) -> tuple[Image.Image, bool, bool]:
    """(RGB image, EXIF-rotated?, downscaled?) or `_Rejected`. Only PNG/JPEG/WEBP are ever parsed."""
    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        w, h = img.size
        if w * h > limits.max_image_pixels:
            raise _Rejected(Reason.TOO_MANY_PIXELS, f"{w}x{h}")
        img.load()
        rotated = img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
        img = ImageOps.exif_transpose(img)
    except _Rejected:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own bound, met at open() for the largest images
        raise _Rejected(Reason.TOO_MANY_PIXELS, str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise _Rejected(Reason.CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}") from exc
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        img = img.convert("RGB")
    if min(img.size) < limits.min_side:
        raise _Rejected(Reason.IMAGE_TOO_SMALL, f"{img.width}x{img.height}")
    downscaled = max(img.size) > limits.max_side
    if downscaled:
        scale = limits.max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    return img, rotated, downscaled


def dhash(img: Image.Image, size: int = 8) -> imagehash.ImageHash:
    """Difference hash (`imagehash.dhash`); two hashes subtract to their Hamming distance."""
    return imagehash.dhash(img, hash_size=size)


def color_thumbnail(img: Image.Image) -> np.ndarray:
    """8x8 RGB thumbnail: dHash only sees gradients, so flat images of different colours would collide."""
    return np.asarray(img.resize((8, 8), Image.Resampling.BILINEAR), dtype=np.float32)


@dataclass(frozen=True)
class _Candidate:
    """A decoded image already written to disk; only what dedupe needs stays in memory."""

    member: _Member
    file: str
    width: int
    height: int
    hash: imagehash.ImageHash
    thumb: np.ndarray


def _read_caption(member: _Member, limits: IntakeLimits) -> str:
    if member.size > limits.max_caption_bytes:
        raise _Rejected(Reason.FILE_TOO_LARGE, f"{member.size} bytes")
    data = member.read(limits.max_caption_bytes)
    if len(data) > limits.max_caption_bytes:
        raise _Rejected(Reason.FILE_TOO_LARGE)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Rejected(Reason.CAPTION_UNREADABLE, "not UTF-8") from exc
    return " ".join(text.split())


def run_intake(source: str | Path, out_dir: str | Path, limits: IntakeLimits) -> IntakeReport:
    """Process `source` (a .zip file or a folder) into `out_dir`: `images/NNNNNN.png` + `manifest.json`.

    Raises `InvalidRequest` only for the dataset as a whole (not a zip, too many members, no usable
    image); everything else is a skipped file or a warning in the report.
    """
    source, out_dir = Path(source), Path(out_dir)
    report = IntakeReport()
    if source.is_dir():
        return _process(list(_folder_members(source, limits, report)), out_dir, limits, report)
    with _open_zip(source) as zf:
        return _process(list(_zip_members(zf, limits, report)), out_dir, limits, report)


def _process(members: list[_Member], out_dir: Path, limits: IntakeLimits, report: IntakeReport) -> IntakeReport:

    images: dict[str, _Member] = {}
    captions: dict[str, _Member] = {}
    for m in members:
        stem, ext = os.path.splitext(m.name)
        ext = ext.lower()
        if ext in IMAGE_EXTENSIONS:
            images[m.name] = m
        elif ext in CAPTION_EXTENSIONS:
            if stem in captions:
                first, second = sorted([captions[stem], m], key=lambda c: CAPTION_EXTENSIONS.index(
                    os.path.splitext(c.name)[1].lower()))
                captions[stem] = first
                report.skip(second.name, Reason.EXTRA_CAPTION, f"{first.name} is used")
            else:
                captions[stem] = m
        else:
            report.skip(m.name, Reason.UNSUPPORTED_TYPE)

    kept: list[_Candidate] = []
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for name in sorted(images):
        member = images[name]
        try:
            data = member.read(limits.max_file_bytes)
            if len(data) > limits.max_file_bytes:
                raise _Rejected(Reason.FILE_TOO_LARGE)
            img, rotated, downscaled = decode_image(data, limits)
        except _Rejected as rej:
            report.skip(name, rej.reason, rej.detail)
            continue
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # a damaged archive member
            report.skip(name, Reason.CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}")
            continue
        hash_, thumb = dhash(img), color_thumbnail(img)
        dup = next((k for k in kept if _near_duplicate(k.hash, k.thumb, hash_, thumb, limits)), None)
        if dup is not None:
            report.skip(name, Reason.DUPLICATE, f"near-duplicate of {dup.member.name}")
            continue
        if len(kept) >= limits.max_images:
            report.skip(name, Reason.IMAGE_LIMIT, f"at most {limits.max_images} images")
            continue
        if rotated:
            report.warn(Warn.EXIF_ROTATED, name)
        if downscaled:
            report.warn(Warn.DOWNSCALED, name)
        rel = f"{IMAGES_DIR}/{len(kept):06d}.png"
        img.save(out_dir / rel, format="PNG")
        kept.append(_Candidate(member, rel, img.width, img.height, hash_, thumb))

    if not kept:
        raise InvalidRequest(
            "the dataset holds no usable image",
            code="dataset_empty",
            details={"skipped": [asdict(s) for s in report.skipped]},
        )

    used_captions: set[str] = set()
    for cand in kept:
        stem = os.path.splitext(cand.member.name)[0]
        caption, caption_file = None, None
        cap_member = captions.get(stem)
        if cap_member is not None:
            used_captions.add(stem)
            try:
                caption = _read_caption(cap_member, limits) or None
                caption_file = cap_member.name if caption else None
            except _Rejected as rej:
                report.skip(cap_member.name, rej.reason, rej.detail)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                report.skip(cap_member.name, Reason.CAPTION_UNREADABLE, f"{type(exc).__name__}: {exc}")
        if caption is None:
            report.warn(Warn.UNCAPTIONED, cand.member.name)
        report.images.append(KeptImage(cand.member.name, cand.file, cand.width, cand.height, caption, caption_file))

    dropped_images = {
        os.path.splitext(s.name)[0] for s in report.skipped if os.path.splitext(s.name)[1].lower() in IMAGE_EXTENSIONS
    }
    for stem, cap_member in sorted(captions.items()):
        if stem not in used_captions and stem not in dropped_images:
            report.skip(cap_member.name, Reason.ORPHAN_CAPTION)

    (out_dir / MANIFEST_NAME).write_text(json.dumps(report.to_dict(), indent=1, sort_keys=True))
    return report


def _near_duplicate(hash_a: imagehash.ImageHash, thumb_a: np.ndarray, hash_b: imagehash.ImageHash,
                    thumb_b: np.ndarray, limits: IntakeLimits) -> bool:
    if hash_a - hash_b > limits.duplicate_hash_bits:
        return False
    return float(np.abs(thumb_a - thumb_b).mean()) <= limits.duplicate_color_delta


def load_manifest(dataset_dir: str | Path) -> IntakeReport:
    """The report `run_intake` wrote beside the normalised images."""
    return IntakeReport.from_dict(json.loads((Path(dataset_dir) / MANIFEST_NAME).read_text()))
