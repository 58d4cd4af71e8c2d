"""`beats.labelled`: labelled sets read from folders, CSVs and DCASE strong-label TSVs, one
entry per file, and splits that put each file in exactly one split."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from beats.errors import InputError
from beats.labelled import (
    Event,
    LabelledDataWarning,
    LabelledSet,
    read_csv,
    read_folder,
    read_labelled_set,
    read_strong_tsv,
    split_by_file,
)

from .audio_files import sf_write


def _table(path, rows, header="path,label"):
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def _caught(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [str(w.message) for w in seen if w.category is LabelledDataWarning]


def test_every_row_twice_is_one_entry_per_file_with_one_warning(tmp_path):
    rows = [f"{c}{i}.wav,{c}" for c in ("a", "b", "c") for i in range(6)]
    table = _table(tmp_path / "twice.csv", rows + rows)  # 36 rows, 18 files
    data, said = _caught(read_csv, table)
    assert len(data) == 18 and len({str(p) for p in data.paths}) == 18
    assert said == [f"{table}: 18 duplicate row(s) dropped (a file listed again with the same "
                    "labels)"]
    train, val, test = split_by_file(data, val_fraction=0.15, test_fraction=0.2, seed=0)
    assert sorted(train + val + test) == list(range(18))
    assert (len(train), len(val), len(test)) == (12, 3, 3)  # one per class held out, twice


def test_a_file_with_other_labels_is_refused_single_label_and_merged_multi_label(tmp_path):
    table = _table(tmp_path / "clash.csv", ["x.wav,dog", "y.wav,cat", "z.wav,cat", "x.wav,cat"])
    with pytest.raises(InputError) as e:
        read_csv(table)
    message = str(e.value)
    assert "rows 2 and 5 give x.wav the labels dog and cat" in message
    assert "\n" not in message and "join its labels with ';'" in message
    multi = _table(tmp_path / "multi.csv", ["x.wav,dog;bark", "y.wav,cat", "x.wav,cat"])
    data, said = _caught(read_csv, multi)
    assert data.multilabel and len(data) == 2 and said == []
    assert data.labels[0] == ("bark", "cat", "dog")
    assert data.targets().tolist() == [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]
    wide = _table(tmp_path / "wide.csv", ["x.wav,1,0", "x.wav,0,1", "y.wav,0,1"],
                  header="path,dog,cat")
    assert read_csv(wide).labels == [("cat", "dog"), ("cat",)]
    folds = _table(tmp_path / "folds.csv", ["x.wav,dog,1", "y.wav,cat,1", "x.wav,dog,2"],
                   header="path,label,fold")
    with pytest.raises(InputError, match=r"rows 2 and 4 put x\.wav in folds 1 and 2"):
        read_csv(folds)
    # the Python API: the same path given twice
    with pytest.raises(InputError, match=r"items 0 and 2 give x\.wav the labels dog and cat"):
        LabelledSet.from_items([(tmp_path / "x.wav", "dog"), (tmp_path / "y.wav", "cat"),
                                (tmp_path / "x.wav", "cat")])
    merged = LabelledSet.from_items([(tmp_path / "x.wav", "dog"), (tmp_path / "x.wav", "cat"),
                                     (np.zeros(16000), "cat")], multilabel=True)
    assert len(merged) == 2 and merged.labels[0] == ("cat", "dog")


def test_tables_that_are_not_utf8_name_the_file_and_the_encoding(tmp_path):
    table = tmp_path / "excel.csv"
    table.write_text("path,label\na.wav,dog\nb.wav,cat\n", encoding="utf-16")
    with pytest.raises(InputError) as e:
        read_labelled_set(table)
    assert str(e.value).startswith(f"{table}: the file is UTF-16 text")
    assert "must be UTF-8" in str(e.value)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("path,label\ncafé.wav,dog\nb.wav,cat\n".encode("latin-1"))
    with pytest.raises(InputError, match=f"{latin}: not UTF-8 text .*save the file as UTF-8"):
        read_csv(latin)
    bom = tmp_path / "bom.csv"  # UTF-8 with a byte-order mark, as spreadsheets save it
    bom.write_text("path,label\na.wav,dog\nb.wav,cat\n", encoding="utf-8-sig")
    assert read_csv(bom).classes == ["cat", "dog"]


def test_a_class_too_small_for_every_split_is_warned_of(tmp_path):
    rows = [f"a{i}.wav,a" for i in range(10)] + [f"b{i}.wav,b" for i in range(10)] + ["c.wav,c"]
    data = read_csv(_table(tmp_path / "l.csv", rows))
    (train, val, test), said = _caught(split_by_file, data, val_fraction=0.2,
                                       test_fraction=0.2)
    assert said == ["class(es) 'c' (1) have fewer files than the 3 splits (train, validation, "
                    "test): they cannot be in every split; add files of them or use fewer "
                    "splits"]
    c = data.labels.index(("c",))
    assert c in train and c not in val + test
    _, quiet = _caught(split_by_file, data, val_fraction=0.0, test_fraction=0.0)
    assert quiet == []  # one split: every class is in it


@pytest.mark.filterwarnings("ignore::beats.labelled.LabelledDataWarning")
def test_split_keeps_a_file_listed_twice_together_and_names_empty_folds(tmp_path):
    same = tmp_path / "same.wav"
    data = LabelledSet([same, same, tmp_path / "b.wav", tmp_path / "c.wav"],
                       [("x",), ("x",), ("x",), ("y",)], ["1", "1", "2", "1"])
    train, val, test = split_by_file(data, test_fold="1", val_fraction=0.0)
    assert test == [0, 1, 3] and train == [2] and val == []
    with pytest.raises(InputError, match="no file is in validation fold '7'"):
        split_by_file(data, val_fold="7", test_fraction=0.0)
    with pytest.raises(InputError, match="no training files left"):
        split_by_file(data, test_fold="1", val_fold="2")


def test_folders_keep_empty_classes_and_digest_follows_files_and_labels(tmp_path):
    for c, n in (("dog", 2), ("cat", 1)):
        (tmp_path / "set" / c).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "set" / c / f"{i}.wav").write_bytes(b"")
    (tmp_path / "set" / "bird").mkdir()
    data = read_folder(tmp_path / "set")
    assert data.classes == ["bird", "cat", "dog"] and len(data) == 3
    digest = data.digest()
    assert digest["files"] == 3 and digest == read_folder(tmp_path / "set").digest()
    (tmp_path / "set" / "cat" / "0.wav").rename(tmp_path / "set" / "dog" / "9.wav")
    assert read_folder(tmp_path / "set").digest()["digest"] != digest["digest"]


# --------------------------------------------------------------------------- strong labels
@pytest.mark.filterwarnings("ignore::beats.labelled.LabelledDataWarning")
def test_strong_tsv_groups_events_per_file(tmp_path):
    (tmp_path / "audio").mkdir()
    for name in ("a", "b", "c"):
        sf_write(tmp_path / "audio" / f"{name}.wav", seconds=2.0)
    tsv = tmp_path / "strong.tsv"
    tsv.write_text("filename\tonset\toffset\tevent_label\n"
                   "audio/a.wav\t1.2\t1.9\tdog\n"
                   "audio/b.wav\t\t\t\n"
                   "audio/a.wav\t0.1\t0.5\tspeech\n"
                   "audio/c.wav\t0\t2.005\tdog\n"
                   "audio/a.wav\t0.1\t0.5\tspeech\n")
    data, said = _caught(read_strong_tsv, tsv)
    assert said == [f"{tsv}: 1 duplicate row(s) dropped (an event listed twice)"]
    assert [p.name for p in data.paths] == ["a.wav", "b.wav", "c.wav"]
    assert data.events[0] == (Event(0.1, 0.5, "speech"), Event(1.2, 1.9, "dog"))
    assert data.events[1] == () and data.labels[1] == ()
    assert data.events[2] == (Event(0.0, 2.005, "dog"),)  # 5 ms past the end: rounding
    assert data.labels == [("dog", "speech"), (), ("dog",)]
    assert data.multilabel and data.classes == ["dog", "speech"]
    train, val, test = split_by_file(data, val_fraction=0.0, test_fraction=0.34)
    assert sorted(train + test) == [0, 1, 2] and not set(train) & set(test) and val == []


def test_strong_tsv_bad_rows_are_refused_together_by_row_number(tmp_path):
    sf_write(tmp_path / "a.wav", seconds=1.0)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not audio")  # no header: no end check
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("filename\tonset\toffset\tevent_label\n"
                   "a.wav\t0.5\t0.2\tdog\n"          # 2: onset after offset
                   "a.wav\t-1\t0.2\tdog\n"           # 3: negative
                   "gone.wav\t0\t1\tdog\n"           # 4: missing file
                   "a.wav\t0.2\t3.0\tdog\n"          # 5: past the end of a 1 s file
                   "a.wav\t0.2\t\tdog\n"             # 6: half an event
                   "a.wav\tsoon\t1\tdog\n"           # 7: not a number
                   "\t0\t1\tdog\n"                   # 8: no file name
                   "broken.wav\t0\t30\tdog\n"        # 9: fine (duration unknown)
                   "a.wav\t0\t1\n")                  # 10: 3 fields
    with pytest.raises(InputError) as e:
        read_strong_tsv(tsv)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{tsv}: bad rows (")
    for part in ("onset after offset: row(s) 2", "negative times: row(s) 3",
                 "file not found: row(s) 4", "event ending after its file: row(s) 5",
                 "must all be given (or all empty): row(s) 6",
                 "not numbers: row(s) 7", "no file name: row(s) 8",
                 "not 4 tab-separated fields: row(s) 10"):
        assert part in message, part
    named = {int(n) for n in re.findall(r"row\(s\) (\d+)", message)}
    assert named == {2, 3, 4, 5, 6, 7, 8, 10}  # row 9's file has no header: not checked
    extra = tmp_path / "extra.tsv"
    extra.write_text("filename\tonset\toffset\tevent_label\tconfidence\na.wav\t0\t1\tdog\t1\n")
    with pytest.raises(InputError, match=r"unknown column\(s\) \['confidence'\]"):
        read_strong_tsv(extra)
    short = tmp_path / "short.tsv"
    short.write_text("filename\tevent_label\na.wav\tdog\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['onset', 'offset'\]"):
        read_labelled_set(short)
