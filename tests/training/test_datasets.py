"""Dataset readers: every layout yields labelled clips with recording ids; auto-detection; recording-disjoint splits.

Fixture folders are written here in each format. Readers never open audio, so the metadata layouts get
metadata only; the folders layout finds clips by walking the tree, so it gets tiny real audio files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf

from sceneprint.training.datasets import (
    DatasetFormatError,
    LabelledClip,
    detect_layout,
    read_dataset,
    split_by_recording,
)
from tests import audio_factory as af

# TAU 2022: ``<scene>-<city>-<location>-<10 s segment>-<1 s index>-<device>``; ``identifier`` is the location.
TAU22_ROWS = [
    ("audio/airport-lisbon-1000-40000-0-a.wav", "airport", "lisbon-1000", "a"),
    ("audio/airport-lisbon-1000-40000-1-a.wav", "airport", "lisbon-1000", "a"),
    ("audio/airport-lisbon-1000-40000-0-s2.wav", "airport", "lisbon-1000", "s2"),
    ("audio/airport-barcelona-203-6129-0-a.wav", "airport", "barcelona-203", "a"),
    ("audio/park-vienna-104-3001-0-b.wav", "park", "vienna-104", "b"),
    ("audio/park-vienna-104-3001-1-b.wav", "park", "vienna-104", "b"),
]
# TUT 2017: ``<recording>_<start>_<end>.wav``, recording id in the third column.
TUT17_ROWS = [
    ("audio/b020_90_100.wav", "beach", "b020"),
    ("audio/b020_100_110.wav", "beach", "b020"),
    ("audio/b021_0_10.wav", "beach", "b021"),
    ("audio/a001_0_10.wav", "bus", "a001"),
    ("audio/a001_10_20.wav", "bus", "a001"),
]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_meta(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    write(root / "meta.csv",
          "filename,scene_label,source_id,fold\n" + "".join(f"{f},{label},{s},1\n" for f, label, s in rows))
    return root


def write_tau22(root: Path, rows: list[tuple[str, str, str, str]] = TAU22_ROWS) -> Path:
    write(root / "meta.csv", "filename\tscene_label\tidentifier\tsource_label\n"
          + "".join("\t".join(r) + "\n" for r in rows))
    write(root / "evaluation_setup" / "fold1_train.csv",
          "filename\tscene_label\n" + "".join(f"{r[0]}\t{r[1]}\n" for r in rows if r[2] != "vienna-104"))
    write(root / "evaluation_setup" / "fold1_evaluate.csv",
          "filename\tscene_label\n" + "".join(f"{r[0]}\t{r[1]}\n" for r in reversed(rows) if r[2] == "vienna-104"))
    write(root / "evaluation_setup" / "fold1_test.csv",
          "filename\n" + "".join(f"{r[0]}\n" for r in rows if r[2] == "vienna-104"))
    return root


def write_tut17(root: Path, rows: list[tuple[str, str, str]] = TUT17_ROWS) -> Path:
    write(root / "meta.txt", "".join("\t".join(r) + "\n" for r in rows))
    for fold, held_out in ((1, "b021"), (2, "b020")):
        write(root / "evaluation_setup" / f"fold{fold}_train.txt",
              "".join(f"{f}\t{label}\n" for f, label, s in rows if s != held_out))
        write(root / "evaluation_setup" / f"fold{fold}_evaluate.txt",
              "".join(f"{f}\t{label}\n" for f, label, s in rows if s == held_out))
    return root


def write_folders(root: Path, files: list[str]) -> Path:
    for i, name in enumerate(files):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, af.noise(seconds=0.01, seed=i), af.RATE)
    return root


def triples(clips: list[LabelledClip], root: Path) -> list[tuple[str, str, str]]:
    return [(c.path.relative_to(root.resolve()).as_posix(), c.label, c.source_id) for c in clips]


def test_meta_layout_reads_labels_and_source_ids_with_absolute_paths(tmp_path: Path) -> None:
    rows = [("audio/a.ogg", "rain", "freesound:1"), ("audio/b.ogg", "rain", "freesound:1"),
            ("audio/c.ogg", "wind", "freesound:2")]
    clips = read_dataset(write_meta(tmp_path, rows), "meta")
    assert triples(clips, tmp_path) == rows
    assert all(c.path.is_absolute() for c in clips)


def test_tau22_recording_id_is_the_location_identifier_shared_by_segments_and_devices(tmp_path: Path) -> None:
    clips = read_dataset(write_tau22(tmp_path), "tau22")
    assert triples(clips, tmp_path) == [(f, label, ident) for f, label, ident, _ in TAU22_ROWS]


def test_tau22_subset_keeps_the_fold_files_clips_in_its_order(tmp_path: Path) -> None:
    write_tau22(tmp_path)
    train = read_dataset(tmp_path, "tau22", subset="train")
    evaluate = read_dataset(tmp_path, "tau22", subset="evaluate")
    test = read_dataset(tmp_path, "tau22", subset="test")  # filenames only: labels come from meta.csv
    assert {c.source_id for c in train} == {"lisbon-1000", "barcelona-203"}
    assert [c.path.name for c in evaluate] == ["park-vienna-104-3001-1-b.wav", "park-vienna-104-3001-0-b.wav"]
    assert [(c.label, c.source_id) for c in test] == [("park", "vienna-104")] * 2
    assert len(train) + len(evaluate) == len(TAU22_ROWS)


def test_tut17_reads_the_headerless_meta_with_recording_ids(tmp_path: Path) -> None:
    clips = read_dataset(write_tut17(tmp_path), "tut17")
    assert triples(clips, tmp_path) == TUT17_ROWS


def test_tut17_subset_and_fold_pick_the_fold_file(tmp_path: Path) -> None:
    write_tut17(tmp_path)
    assert {c.source_id for c in read_dataset(tmp_path, "tut17", subset="evaluate")} == {"b021"}
    assert {c.source_id for c in read_dataset(tmp_path, "tut17", subset="evaluate", fold=2)} == {"b020"}
    assert {c.source_id for c in read_dataset(tmp_path, "tut17", subset="train", fold=2)} == {"b021", "a001"}


def test_folders_layout_labels_by_top_folder_and_gives_each_file_its_own_recording(tmp_path: Path) -> None:
    write_folders(tmp_path, ["dog/a.wav", "dog/park/b.FLAC", "rain/c.wav", "rain/.d.wav", "rain/._c.wav"])
    write(tmp_path / "rain" / "notes.txt", "not audio")
    clips = read_dataset(tmp_path, "folders")
    assert triples(clips, tmp_path) == [("dog/a.wav", "dog", "dog/a"), ("dog/park/b.FLAC", "dog", "dog/park/b"),
                                        ("rain/c.wav", "rain", "rain/c")]


@pytest.mark.parametrize("layout", ["meta", "tau22", "tut17", "folders"])
def test_auto_detects_each_layout(tmp_path: Path, layout: str) -> None:
    root = {
        "meta": lambda: write_meta(tmp_path, [("audio/a.wav", "rain", "r1")]),
        "tau22": lambda: write_tau22(tmp_path),
        "tut17": lambda: write_tut17(tmp_path),
        "folders": lambda: write_folders(tmp_path, ["rain/a.wav"]),
    }[layout]()
    assert detect_layout(root) == layout
    assert read_dataset(root) == read_dataset(root, layout)


def test_auto_on_an_unrecognised_meta_csv_names_it_and_the_expected_headers(tmp_path: Path) -> None:
    write(tmp_path / "meta.csv", "file,label\naudio/a.wav,rain\n")
    with pytest.raises(DatasetFormatError, match=r"meta\.csv.*source_id.*identifier"):
        read_dataset(tmp_path)


def test_auto_on_a_folder_without_a_dataset_names_the_root_and_what_it_looked_for(tmp_path: Path) -> None:
    write(tmp_path / "rain" / "readme.txt", "no audio here")
    with pytest.raises(DatasetFormatError, match=r"no dataset found in .*meta\.csv.*meta\.txt.*\.wav"):
        read_dataset(tmp_path)


def test_meta_without_a_required_column_names_the_file_and_the_column(tmp_path: Path) -> None:
    write(tmp_path / "meta.csv", "filename,scene_label\naudio/a.wav,rain\n")
    with pytest.raises(DatasetFormatError, match=r"meta\.csv: header lacks source_id"):
        read_dataset(tmp_path, "meta")


def test_a_tau22_meta_read_as_meta_hints_at_the_tau22_layout(tmp_path: Path) -> None:
    write_tau22(tmp_path)
    with pytest.raises(DatasetFormatError, match="layout='tau22'"):
        read_dataset(tmp_path, "meta")


@pytest.mark.parametrize(("line", "problem"), [
    ("audio/b.wav,wind\n", "no value for source_id"),
    ("audio/b.wav,wind,,1\n", "no value for source_id"),
    ("audio/b.wav,wind,r2,1,extra\n", "more fields than the header"),
    ("audio/a.wav,wind,r2,1\n", "already listed on line 2"),
    ("../elsewhere/b.wav,wind,r2,1\n", "not a path inside"),
])
def test_a_malformed_meta_row_is_an_error_naming_its_line(tmp_path: Path, line: str, problem: str) -> None:
    write(tmp_path / "meta.csv", "filename,scene_label,source_id,fold\naudio/a.wav,rain,r1,1\n" + line)
    with pytest.raises(DatasetFormatError, match=rf"meta\.csv, line 3: .*{problem}"):
        read_dataset(tmp_path, "meta")


def test_a_tut17_line_without_a_recording_id_is_an_error_naming_its_line(tmp_path: Path) -> None:
    write(tmp_path / "meta.txt", "audio/b020_0_10.wav\tbeach\tb020\naudio/b020_10_20.wav\tbeach\n")
    with pytest.raises(DatasetFormatError, match=r"meta\.txt, line 2: expected 3 tab-separated fields"):
        read_dataset(tmp_path)


def test_a_fold_file_listing_a_clip_missing_from_meta_is_an_error(tmp_path: Path) -> None:
    write_tau22(tmp_path)
    write(tmp_path / "evaluation_setup" / "fold1_evaluate.csv", "filename\tscene_label\naudio/ghost.wav\tpark\n")
    with pytest.raises(DatasetFormatError, match=r"fold1_evaluate\.csv, line 2: 'audio/ghost\.wav' is not in"):
        read_dataset(tmp_path, subset="evaluate")


def test_audio_directly_in_the_root_of_a_folders_dataset_is_an_error(tmp_path: Path) -> None:
    write_folders(tmp_path, ["rain/a.wav", "stray.wav"])
    with pytest.raises(DatasetFormatError, match=r"stray\.wav: audio file directly in"):
        read_dataset(tmp_path, "folders")


def test_bad_arguments_are_errors_that_list_the_valid_choices(tmp_path: Path) -> None:
    write_tut17(tmp_path)
    with pytest.raises(ValueError, match="valid layouts: auto, meta, folders, tau22, tut17"):
        read_dataset(tmp_path, "esc50")
    with pytest.raises(ValueError, match="valid subsets: train, evaluate, test"):
        read_dataset(tmp_path, subset="validation")
    with pytest.raises(FileNotFoundError, match=r"fold3_train\.txt"):
        read_dataset(tmp_path, subset="train", fold=3)
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        read_dataset(tmp_path / "absent")
    meta_root = write_meta(tmp_path / "meta", [("audio/a.wav", "rain", "r1")])
    with pytest.raises(ValueError, match="subset applies to tau22, tut17"):
        read_dataset(meta_root, subset="train")


def many_recordings(n_classes: int = 4, recordings: int = 7, clips_per_recording: int = 3) -> list[LabelledClip]:
    return [LabelledClip(Path(f"/data/c{c}/r{r}_{k}.wav"), f"class{c}", f"c{c}-r{r}")
            for c in range(n_classes) for r in range(recordings) for k in range(clips_per_recording)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.99])
def test_split_by_recording_never_puts_a_recording_on_both_sides(seed: int, fraction: float) -> None:
    clips = many_recordings()
    train, test = split_by_recording(clips, fraction, seed)
    assert {c.source_id for c in train}.isdisjoint({c.source_id for c in test})
    assert sorted(train + test, key=clips.index) == clips
    # Every class keeps at least one recording on each side, however small or large the fraction.
    assert {c.label for c in train} == {c.label for c in test} == {c.label for c in clips}


def test_split_by_recording_takes_the_fraction_of_each_class_and_depends_only_on_the_seed() -> None:
    clips = many_recordings(recordings=10)
    test = split_by_recording(clips, 0.3, seed=7)[1]
    assert len({c.source_id for c in test}) == 4 * 3
    assert split_by_recording(list(reversed(clips)), 0.3, seed=7)[1] == list(reversed(test))
    assert split_by_recording(clips, 0.3, seed=8)[1] != test


def test_split_by_recording_keeps_a_single_recording_class_in_train_and_rejects_bad_fractions() -> None:
    clips = [*many_recordings(n_classes=1), LabelledClip(Path("/data/lone.wav"), "lone", "lone-r0")]
    train, test = split_by_recording(clips, 0.5, seed=0)
    assert "lone" in {c.label for c in train} and "lone" not in {c.label for c in test}
    for fraction in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            split_by_recording(clips, fraction, seed=0)


def test_the_sceneprint_dev_meta_reads_with_auto_detection(dev_root: Path) -> None:
    root = dev_root
    clips = read_dataset(root)
    assert detect_layout(root) == "meta"
    assert len(clips) == 1600
    assert len({c.label for c in clips}) == 40
    assert all(c.path.is_file() for c in clips[:20])
