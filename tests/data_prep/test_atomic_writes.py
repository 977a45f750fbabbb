"""Specification of atomic writes: a conversion or a split that stops half-way leaves nothing that
looks complete, and a failed --overwrite leaves the old dataset as it was."""

import json

import pytest
from raw_sources import entries

import data_prep.readers as readers
import data_prep.splits as splits
from data_prep import DataPrepError
from data_prep.__main__ import main
from data_prep.convert import convert
from data_prep.parquet import open_dataset, verify_dataset
from data_prep.readers import DatasetReader, PartitionSource
from data_prep.splits import SplitSpec, make_split, save_split


def stl10_reader_failing_in(split, error, *, after_chunks=1):
    """The real STL-10 reader, except that `split` raises `error` after yielding `after_chunks`."""

    def read(source=None, **options):
        raw = readers.read_stl10(source, **options)
        real = raw.partitions[split]

        def chunks():
            for n, chunk in enumerate(real.chunks()):
                if n == after_chunks:
                    raise error
                yield chunk
            raise error

        raw.partitions[split] = PartitionSource(real.count, chunks)
        return raw

    return DatasetReader("stl10", read, True, readers.DATASETS["stl10"].source_hint)


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("split", ["train", "unlabeled"])
@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()], ids=["crash", "ctrl-c"])
def test_conversion_interrupted_mid_way_leaves_no_dataset_and_no_temporary_folder(
        tmp_path, stl10_source, monkeypatch, split, error):
    monkeypatch.setitem(readers.DATASETS, "stl10", stl10_reader_failing_in(split, error))
    with pytest.raises(type(error)):
        convert("stl10", stl10_source.path, tmp_path / "data", chunk_size=2)
    assert entries(tmp_path / "data") == []  # no stl10/, no .stl10.partial-*/


def test_source_yielding_fewer_images_than_announced_is_an_error_and_leaves_nothing(tmp_path, stl10_source,
                                                                                     monkeypatch):
    def read(source=None, **options):
        raw = readers.read_stl10(source, **options)
        real = raw.partitions["unlabeled"]
        raw.partitions["unlabeled"] = PartitionSource(real.count + 1, real.chunks)
        return raw

    monkeypatch.setitem(readers.DATASETS, "stl10", DatasetReader("stl10", read, True, "hint"))
    with pytest.raises(DataPrepError, match=r"^unlabeled: source yielded 5 images, expected 6$"):
        convert("stl10", stl10_source.path, tmp_path / "data", chunk_size=2)
    assert entries(tmp_path / "data") == []


def test_failed_overwrite_leaves_the_old_dataset_intact(tmp_path, stl10_source, monkeypatch):
    info, _ = convert("stl10", stl10_source.path, tmp_path / "data", chunk_size=2)
    save_split(info, make_split(info, SplitSpec("mcar", 1, size=10)))
    before = snapshot(info.path)
    monkeypatch.setitem(readers.DATASETS, "stl10", stl10_reader_failing_in("unlabeled", RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        convert("stl10", stl10_source.path, tmp_path / "data", overwrite=True, chunk_size=2)
    assert entries(tmp_path / "data") == ["stl10"]
    assert snapshot(info.path) == before
    verify_dataset(open_dataset("stl10", tmp_path / "data"))


def test_successful_overwrite_replaces_the_dataset_and_leaves_no_old_copy(tmp_path, cifar10_source, stl10_source):
    convert("cifar10", cifar10_source.path, tmp_path / "data")
    (tmp_path / "data" / "cifar10" / "stale.txt").write_text("from the old conversion")
    info, _ = convert("cifar10", cifar10_source.path, tmp_path / "data", overwrite=True)
    assert entries(tmp_path / "data") == ["cifar10"]
    assert not (info.path / "stale.txt").exists()
    verify_dataset(info)


def test_converting_over_an_existing_dataset_without_overwrite_is_refused(tmp_path, cifar10_source, cli_error):
    info, _ = convert("cifar10", cifar10_source.path, tmp_path / "data")
    before = snapshot(info.path)
    line = cli_error("convert", "cifar10", "--source", cifar10_source.path, "--data-root", tmp_path / "data")
    assert line == f"error: {info.path} already exists (pass --overwrite to replace it)"
    assert snapshot(info.path) == before
    assert main(["convert", "cifar10", "--source", str(cifar10_source.path), "--data-root", str(tmp_path / "data"),
                 "--overwrite"]) == 0
    assert entries(tmp_path / "data") == ["cifar10"]


def test_split_file_write_that_fails_leaves_no_file(synth, monkeypatch):
    split = make_split(synth.info, SplitSpec("mcar", 1, size=10))

    def failing_dump(obj, f):
        f.write('{"name": "half')
        raise OSError("disk full")

    monkeypatch.setattr(splits.json, "dump", failing_dump)
    with pytest.raises(OSError):
        save_split(synth.info, split)
    monkeypatch.undo()
    assert entries(synth.info.path / "splits") == []
    assert json.loads(save_split(synth.info, split).read_text())["labeled_indices"] == split.labeled_indices.tolist()


def test_a_launch_that_finds_its_dataset_converted_by_another_meanwhile_uses_it(tmp_path, monkeypatch):
    # Two launches at once: both looked before either finished converting; this one's conversion
    # then finds the other's finished dataset in place, and uses it instead of failing.
    import data_prep.convert
    from data_prep.convert import prepare
    from data_prep.parquet import open_dataset

    other = prepare("digits", tmp_path / "data")  # the other launch, done first
    looks = []

    def looked_too_early(name, root):
        looks.append(name)
        if len(looks) == 1:
            raise DataPrepError(f"dataset '{name}' not found under {root}")
        return open_dataset(name, root)

    monkeypatch.setattr(data_prep.convert, "open_dataset", looked_too_early)
    assert prepare("digits", tmp_path / "data").checksum == other.checksum
    assert entries(tmp_path / "data") == ["digits"]  # no temporary folder left
