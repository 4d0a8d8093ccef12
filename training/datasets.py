"""Dataset readers: an audio dataset folder in, a list of labelled clips out.

Few-shot evaluation needs three things per clip: where its audio is, its scene label, and the recording
it came from (supports and queries must never share a recording, or the score measures recording
identity instead of the scene). Every layout is read into the same ``LabelledClip``:

- ``meta``: ``meta.csv``, comma-separated, with at least ``filename``, ``scene_label`` and ``source_id``
  (the sceneprint-dev format).
- ``folders``: ``root/<class>/**/<clip>.{wav,flac,ogg,mp3,opus}``; nothing says which files share a
  recording, so each file is its own recording.
- ``tau22``: TAU Urban Acoustic Scenes 2022 Mobile (DCASE 2022 task 1): tab-separated ``meta.csv``
  with ``filename``, ``scene_label``, ``identifier`` and ``source_label``, folds in
  ``evaluation_setup/fold<k>_<subset>.csv``.
- ``tut17``: TUT Acoustic Scenes 2017 (DCASE 2017 task 1): ``meta.txt``, tab-separated lines without a
  header (filename, scene label, recording id), folds in ``evaluation_setup/fold<k>_<subset>.txt``.

Readers never open the audio files; decoding (and reporting a missing file) is left to
``sceneprint.audio.decode_clip`` at the point of use.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LAYOUTS = ("auto", "meta", "folders", "tau22", "tut17")
SUBSETS = ("train", "evaluate", "test")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")

_META_COLUMNS = ("filename", "scene_label", "source_id")
_TAU22_COLUMNS = ("filename", "scene_label", "identifier")
# Spreadsheet tools prepend a byte-order mark to CSV exports; reading with utf-8-sig keeps it out of the
# first column's name, which would otherwise no longer read "filename".
_ENCODING = "utf-8-sig"


@dataclass(frozen=True)
class LabelledClip:
    path: Path  # absolute path of the audio file
    label: str  # scene / class label
    source_id: str  # recording id: supports and queries are never drawn from the same one


class DatasetFormatError(ValueError):
    """A dataset folder whose metadata cannot be read as the layout asked for (or any layout, for auto)."""


def read_dataset(root: Path, layout: str = "auto", *, subset: str | None = None, fold: int = 1) -> list[LabelledClip]:
    """Read a dataset folder into labelled clips, in the order its metadata lists them.

    Args:
        root: The dataset folder (the one holding ``meta.csv``/``meta.txt``, or the class folders).
        layout: One of ``LAYOUTS``; ``auto`` picks one with ``detect_layout``.
        subset: For ``tau22`` and ``tut17`` only: ``train``, ``evaluate`` or ``test`` keeps the clips that
            fold file lists, in its order (labels and recording ids still come from the meta file);
            None keeps every clip of the meta file.
        fold: The cross-validation fold whose file ``subset`` picks (TAU 2022 has fold 1 only, TUT 2017
            folds 1 to 4).

    Returns:
        One ``LabelledClip`` per clip the metadata lists (per audio file found, for ``folders``).

    Raises:
        FileNotFoundError: ``root`` or the fold file does not exist.
        DatasetFormatError: The metadata is malformed, or ``auto`` recognises no layout.
        ValueError: An unknown layout or subset, or a subset for a layout without folds.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    if subset is not None and subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; valid subsets: {', '.join(SUBSETS)} (or None for all)")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    root = root.resolve()
    if layout == "auto":
        layout = detect_layout(root)
    if subset is None:
        return _READERS[layout](root)
    if layout not in _FOLD_LAYOUTS:
        raise ValueError(f"layout {layout!r} has no fold files; subset applies to {', '.join(_FOLD_LAYOUTS)}")
    return _read_fold(root, layout, subset, fold)


def detect_layout(root: Path) -> str:
    """The layout of ``root``, from the files it holds.

    A ``meta.csv`` whose tab-separated header names ``identifier`` is ``tau22``; one whose comma-separated
    header names ``filename``, ``scene_label`` and ``source_id`` is ``meta``; a ``meta.txt`` is ``tut17``;
    a folder with neither is ``folders`` if it holds audio files in class folders.

    Raises:
        DatasetFormatError: ``meta.csv`` has neither header, or nothing recognisable is there.
    """
    meta_csv = root / "meta.csv"
    if meta_csv.is_file():
        with meta_csv.open(newline="", encoding=_ENCODING) as f:
            header = f.readline().rstrip("\r\n")
        tab_fields = {field.strip() for field in header.split("\t")}
        comma_fields = {field.strip() for field in next(csv.reader([header]), [])}
        if set(_TAU22_COLUMNS) <= tab_fields:
            return "tau22"
        if set(_META_COLUMNS) <= comma_fields:
            return "meta"
        raise DatasetFormatError(
            f"{meta_csv}: unrecognised header {header!r}; looked for comma-separated "
            f"{', '.join(_META_COLUMNS)} (meta layout) or tab-separated {', '.join(_TAU22_COLUMNS)} (tau22)"
        )
    if (root / "meta.txt").is_file():
        return "tut17"
    if any(_audio_files(root)):
        return "folders"
    raise DatasetFormatError(
        f"no dataset found in {root}: looked for meta.csv (meta or tau22 layout), meta.txt (tut17) and "
        f"audio files ({', '.join(AUDIO_SUFFIXES)}) in class folders (folders layout)"
    )


def split_by_recording(
    clips: Sequence[LabelledClip], test_fraction: float, seed: int
) -> tuple[list[LabelledClip], list[LabelledClip]]:
    """Split clips into train and test so that no recording has clips on both sides.

    Recordings are drawn per class (per set of labels, for a recording with several): about
    ``test_fraction`` of each class's recordings go to test, rounded, but at least one and never all of
    them, so every class with two or more recordings appears on both sides; a class with a single
    recording stays in train.

    Args:
        clips: The clips to split.
        test_fraction: Share of each class's recordings to put in test, strictly between 0 and 1.
        seed: Seed of the draw; the split depends only on it and on the set of clips, not their order.

    Returns:
        (train, test), each in the order of ``clips``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    labels_of: dict[str, set[str]] = defaultdict(set)
    for clip in clips:
        labels_of[clip.source_id].add(clip.label)
    strata: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for source_id in sorted(labels_of):
        strata[tuple(sorted(labels_of[source_id]))].append(source_id)
    rng = np.random.default_rng(seed)
    test_sources: set[str] = set()
    for key in sorted(strata):
        sources = strata[key]
        n_test = min(max(round(test_fraction * len(sources)), 1), len(sources) - 1)
        test_sources.update(sources[int(i)] for i in rng.permutation(len(sources))[:n_test])
    return ([c for c in clips if c.source_id not in test_sources],
            [c for c in clips if c.source_id in test_sources])


def _read_meta(root: Path) -> list[LabelledClip]:
    path = root / "meta.csv"
    rows = _read_table(path, delimiter=",", columns=_META_COLUMNS)
    return _to_clips(root, path, ((line, r["filename"], r["scene_label"], r["source_id"]) for line, r in rows))


def _read_tau22(root: Path) -> list[LabelledClip]:
    # ``identifier`` names the recording location (``lisbon-1000``), shared by every 1 s segment cut from
    # it and by the parallel recordings of all devices; the file name's finer parts (10 s segment, 1 s
    # index, device) would let one place's sound sit on both sides of an episode.
    path = root / "meta.csv"
    rows = _read_table(path, delimiter="\t", columns=_TAU22_COLUMNS)
    return _to_clips(root, path, ((line, r["filename"], r["scene_label"], r["identifier"]) for line, r in rows))


def _read_tut17(root: Path) -> list[LabelledClip]:
    path = root / "meta.txt"
    entries: list[tuple[int, str, str, str]] = []
    with path.open(newline="", encoding=_ENCODING) as f:
        reader = csv.reader(f, delimiter="\t")
        for row in reader:
            if not row:
                continue
            fields = [field.strip() for field in row]
            if len(fields) != 3 or not all(fields):
                raise DatasetFormatError(
                    f"{path}, line {reader.line_num}: expected 3 tab-separated fields "
                    f"(filename, scene label, recording id), got {row!r}"
                )
            filename, label, source_id = fields
            entries.append((reader.line_num, filename, label, source_id))
    return _to_clips(root, path, entries)


def _read_folders(root: Path) -> list[LabelledClip]:
    clips = []
    for path in _audio_files(root):
        relative = path.relative_to(root)
        if len(relative.parts) < 2:
            raise DatasetFormatError(
                f"{path}: audio file directly in {root}; the folders layout takes the class from the folder "
                "a file sits in (root/<class>/<file>)"
            )
        # Nothing in a bare folder tree says which files come from one recording, so each file is its own
        # (the relative path keeps ids unique across classes); use the meta layout to group segments.
        clips.append(LabelledClip(path=path, label=relative.parts[0], source_id=relative.with_suffix("").as_posix()))
    if not clips:
        raise DatasetFormatError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) in class folders under {root}")
    return clips


def _audio_files(root: Path) -> list[Path]:
    # Hidden entries are skipped: archives unpacked on macOS carry ``._name.wav`` resource-fork files that
    # have an audio suffix but hold no audio.
    return sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in AUDIO_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )


_READERS: dict[str, Callable[[Path], list[LabelledClip]]] = {
    "meta": _read_meta,
    "folders": _read_folders,
    "tau22": _read_tau22,
    "tut17": _read_tut17,
}
_FOLD_LAYOUTS = ("tau22", "tut17")


def _read_fold(root: Path, layout: str, subset: str, fold: int) -> list[LabelledClip]:
    """The meta file's clips that ``evaluation_setup/fold<fold>_<subset>`` lists, in its order."""
    path = root / "evaluation_setup" / f"fold{fold}_{subset}.{'csv' if layout == 'tau22' else 'txt'}"
    if not path.is_file():
        raise FileNotFoundError(f"fold file not found: {path}")
    listed: list[tuple[int, str]]
    if layout == "tau22":  # TAU's fold files have a header, TUT's do not
        listed = [(line, r["filename"]) for line, r in _read_table(path, delimiter="\t", columns=("filename",))]
    else:
        with path.open(newline="", encoding=_ENCODING) as f:
            reader = csv.reader(f, delimiter="\t")
            listed = [(reader.line_num, row[0].strip()) for row in reader if row and row[0].strip()]
    by_path = {clip.path: clip for clip in _READERS[layout](root)}
    selected = []
    for line, filename in listed:
        clip = by_path.get(root / filename)
        if clip is None:
            raise DatasetFormatError(f"{path}, line {line}: {filename!r} is not in the dataset's meta file")
        selected.append(clip)
    if not selected:
        raise DatasetFormatError(f"{path} lists no clips")
    return selected


def _read_table(path: Path, *, delimiter: str, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a delimited file with a header, as (line number, {column: stripped value}) for ``columns``."""
    with path.open(newline="", encoding=_ENCODING) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        found = [name.strip() for name in reader.fieldnames or []]
        missing = [c for c in columns if c not in found]
        if missing:
            hint = " (the header is tab-separated: a TAU 2022 meta.csv reads with layout='tau22')" if (
                delimiter != "\t" and any("\t" in name for name in found)) else ""
            raise DatasetFormatError(f"{path}: header lacks {', '.join(missing)}; found {found}{hint}")
        reader.fieldnames = found
        rows = []
        for row in reader:
            if None in row:
                raise DatasetFormatError(f"{path}, line {reader.line_num}: more fields than the header names")
            values = {c: (row[c] or "").strip() for c in columns}
            empty = [c for c, v in values.items() if not v]
            if empty:
                raise DatasetFormatError(f"{path}, line {reader.line_num}: no value for {', '.join(empty)}")
            rows.append((reader.line_num, values))
    return rows


def _to_clips(root: Path, source: Path, entries: Iterable[tuple[int, str, str, str]]) -> list[LabelledClip]:
    clips = []
    first_line: dict[Path, int] = {}
    for line, filename, label, source_id in entries:
        relative = Path(filename)
        # A file outside the dataset folder would make the dataset depend on where it was unpacked.
        if relative.is_absolute() or ".." in relative.parts:
            raise DatasetFormatError(f"{source}, line {line}: {filename!r} is not a path inside {root}")
        if relative in first_line:
            raise DatasetFormatError(
                f"{source}, line {line}: {filename!r} is already listed on line {first_line[relative]}")
        first_line[relative] = line
        clips.append(LabelledClip(path=root / relative, label=label, source_id=source_id))
    if not clips:
        raise DatasetFormatError(f"{source} lists no clips")
    return clips
