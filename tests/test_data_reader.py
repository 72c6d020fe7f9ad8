"""The SA1B-Dense-Caption reader: three cap_seg forms, global row ids, bad rows, missing columns."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llava_lib.data import DataFormatError, parse_cap_seg, read_sa1b

pytestmark = pytest.mark.timeout(30)


def read_rows(src, start=0, limit=None):
    rows = read_sa1b(src, start, limit)
    return list(rows), rows.stats


def _write(path, urls, cap_seg, **extra):
    pq.write_table(pa.table({"url": pa.array(urls, pa.string()), "cap_seg": cap_seg, **extra}), path)
    return path


@pytest.fixture
def three_forms(tmp_path):
    """Three shards, one per cap_seg form, under the dataset layout {root}/data/*.parquet."""
    data = tmp_path / "ds" / "data"
    data.mkdir(parents=True)
    caps = [{"global_caption": f"图{i}", "local_caption": ["x"]} for i in range(9)]
    _write(data / "train-00000.parquet", [f"http://h/{i}.jpg" for i in range(3)], pa.array(caps[:3]))
    _write(data / "train-00001.parquet", [f"http://h/{i}.jpg" for i in range(3, 6)],
           pa.array([json.dumps(c, ensure_ascii=False) for c in caps[3:6]]))
    _write(data / "train-00002.parquet", [f"http://h/{i}.jpg" for i in range(6, 9)],
           pa.array([repr(c) for c in caps[6:9]]))
    return tmp_path / "ds"


def test_three_cap_seg_forms_and_global_row_ids(three_forms):
    rows, stats = read_rows(three_forms)
    assert [r.caption for r in rows] == [f"图{i}" for i in range(9)]
    assert [r.row_id for r in rows] == list(range(9))
    assert [r.url for r in rows] == [f"http://h/{i}.jpg" for i in range(9)]
    assert stats.rows == 9 and stats.bad_rows == 0


def test_start_limit_and_file_list(three_forms):
    files = sorted((three_forms / "data").glob("*.parquet"))
    rows, _ = read_rows(three_forms, start=2, limit=5)
    assert [r.row_id for r in rows] == [2, 3, 4, 5, 6]
    assert read_sa1b(three_forms, start=2, limit=5).num_rows() == 5
    # A list of files: row ids count from its first file.
    assert [r.row_id for r in read_sa1b(files[1:2])] == [0, 1, 2]
    assert [r.caption for r in read_sa1b(files[1:2])] == ["图3", "图4", "图5"]


def test_start_skips_row_groups(tmp_path):
    path = tmp_path / "one.parquet"
    caps = pa.array([json.dumps({"global_caption": f"c{i}"}) for i in range(100)])
    pq.write_table(pa.table({"url": [f"u{i}" for i in range(100)], "cap_seg": caps}), path, row_group_size=7)
    assert [r.row_id for r in read_sa1b(path, start=50, limit=3)] == [50, 51, 52]
    assert [r.caption for r in read_sa1b(path, start=50, limit=3)] == ["c50", "c51", "c52"]


def test_bad_rows_counted_skipped_and_named(tmp_path):
    path = _write(tmp_path / "bad.parquet", ["u0", "u1", "u2", None, "u4", "u5"],
                  pa.array(['{"global_caption": "好"}', "{not json or python", '{"local_caption": []}',
                            '{"global_caption": "无网址"}', "__import__('os').system('echo pwned')",
                            "{'global_caption': '字面量'}"]))
    bad = []
    rows = read_sa1b(path, on_bad=lambda rid, url, msg: bad.append((rid, msg)))
    got = list(rows)
    assert [(r.row_id, r.caption) for r in got] == [(0, "好"), (5, "字面量")]
    assert rows.stats.bad_rows == 4 and [rid for rid, _ in bad] == [1, 2, 3, 4]
    for rid, msg in bad:  # names the file, the row and the problem
        assert "bad.parquet" in msg and f"第 {rid} 行" in msg
    assert "global_caption" in bad[1][1] and "url" in bad[2][1]
    assert "4" in rows.stats.summary()


def test_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "nocap.parquet"
    pq.write_table(pa.table({"url": ["u"], "caption": ["c"]}), path)
    with pytest.raises(DataFormatError) as e:
        list(read_sa1b(path))
    assert "nocap.parquet" in str(e.value) and "cap_seg" in str(e.value)


def test_no_parquet_files(tmp_path):
    with pytest.raises(DataFormatError, match="找不到 parquet"):
        read_sa1b(tmp_path)


def test_only_url_and_cap_seg_are_read(tmp_path, monkeypatch):
    """Column projection: a big unrelated column is never requested."""
    path = _write(tmp_path / "wide.parquet", ["u"], pa.array(['{"global_caption": "c"}']),
                  masks=pa.array([b"x" * 1000]))
    seen = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("columns"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    assert [r.caption for r in read_sa1b(path)] == ["c"]
    assert seen == [["url", "cap_seg"]]


def test_parse_cap_seg_forms():
    assert parse_cap_seg({"global_caption": " a "}) == "a"
    assert parse_cap_seg('{"global_caption": "b"}') == "b"
    assert parse_cap_seg("{'global_caption': 'c'}") == "c"
    assert parse_cap_seg(b'{"global_caption": "d"}') == "d"
    for bad in (None, 3, "[]", "{'global_caption': ''}", "open('x')"):
        with pytest.raises(ValueError):
            parse_cap_seg(bad)
