"""The fetch-once cache: faults end in the manifest, good images all arrive, resume after SIGKILL is exact."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from fakes import EXPECTED_REASONS, ImageServer, scene_captions, scene_jpegs, standard_faults, write_sa1b

from llava_lib.data import (CacheError, CachedImageDataset, cached_row_ids, load_failures, main, prepare_cache,
                            read_sa1b, shard_paths)
from llava_lib.data.cache import _lock

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 200_000
FAST = dict(workers=4, timeout=0.5, retries=2, backoff=0.02, max_bytes=MAX_BYTES, progress=False)


def _world(tmp_path, n_good=24, seed=3, delay=0.0, bad_row=True):
    """A server with n_good scenes and one of each fault, and a 2-shard SA1B source that mixes them in.

    Returns (server, src_dir, good: {row_id: (path, caption)}, faults: {row_id: expected reason}).
    """
    jpegs, caps = scene_jpegs(n_good, seed), scene_captions(n_good, seed)
    fault_paths = sorted(EXPECTED_REASONS)
    files = {f"/img/{i:04d}.jpg": j for i, j in enumerate(jpegs)}
    files["/fault/flaky.jpg"] = jpegs[0]
    server = ImageServer(files, standard_faults(jpegs[1], MAX_BYTES), delay=delay).start()
    urls, captions, good, faults = [], [], {}, {}
    for i in range(n_good):  # a fault after every few good rows
        good[len(urls)] = (f"/img/{i:04d}.jpg", caps[i])
        urls.append(server.url(f"/img/{i:04d}.jpg"))
        captions.append(caps[i])
        if i % 3 == 1 and fault_paths:
            p = fault_paths.pop()
            faults[len(urls)] = EXPECTED_REASONS[p]
            urls.append(server.url(p))
            captions.append(f"坏图 {p}")
    good[len(urls)] = ("/fault/flaky.jpg", "五百两次然后成功")
    urls.append(server.url("/fault/flaky.jpg"))
    captions.append("五百两次然后成功")
    for p in fault_paths:
        faults[len(urls)] = EXPECTED_REASONS[p]
        urls.append(server.url(p))
        captions.append(f"坏图 {p}")
    data = tmp_path / "src" / "data"
    data.mkdir(parents=True)
    half = len(urls) // 2
    write_sa1b(data / "train-00000-of-00002.parquet", urls[:half], captions[:half], form="json")
    write_sa1b(data / "train-00001-of-00002.parquet", urls[half:], captions[half:], form="struct")
    if bad_row:  # a third shard with one malformed cap_seg
        import pyarrow as pa
        rid = len(urls)
        pq.write_table(pa.table({"url": [server.url("/img/0000.jpg")], "cap_seg": ["{broken"]}),
                       data / "train-00002-of-00002.parquet")
        faults[rid] = "bad_row"
    return server, tmp_path / "src", good, faults


def _shard_rows(out):
    rows = []
    for path in shard_paths(out):
        t = pq.read_table(path)  # every shard readable, whole
        for rid, jpeg, cap in zip(t.column("row_id").to_pylist(), t.column("jpeg").to_pylist(),
                                  t.column("caption").to_pylist()):
            img = Image.open(io.BytesIO(jpeg))
            img.load()
            assert img.size == (224, 224)
            rows.append((rid, cap))
    return rows


def test_faults_are_skipped_counted_and_good_images_all_arrive(tmp_path):
    server, src, good, faults = _world(tmp_path)
    out = tmp_path / "cache"
    t0 = time.monotonic()
    try:
        report = prepare_cache(src, out, shard_rows=5, **FAST)
        elapsed = time.monotonic() - t0
        rows = _shard_rows(out)
        assert sorted(rows) == sorted((rid, cap) for rid, (_, cap) in good.items())  # each good row once
        manifest = load_failures(out)
        assert {rid: r["reason"] for rid, r in manifest.items()} == faults
        for rid, r in manifest.items():
            assert r["message"] and ("url" in r)
        assert report.complete and report.cached_new == len(good) and report.cached_total == len(good)
        assert sum(report.failed_new.values()) == len(faults) and report.failed_total == len(faults)
        assert report.failed_new["bad_row"] == 1 and report.failed_new["timeout"] == 2
        assert "失败" in report.summary() and json.loads((out / "summary.json").read_text())["complete"]
        assert elapsed < 30

        # A rerun fetches nothing that is done or failed for good; only transient failures are retried.
        hits = dict(server.hits)
        again = prepare_cache(src, out, shard_rows=5, **FAST)
        transient = {p for p, r in EXPECTED_REASONS.items() if r in ("timeout", "http_503", "http_403")}
        changed = {p for p in server.hits if server.hits[p] != hits.get(p, 0)}
        assert changed == transient
        assert again.cached_new == 0 and again.cached_total == len(good)
        assert sorted(_shard_rows(out)) == sorted(rows)
        assert {rid: r["reason"] for rid, r in load_failures(out).items()} == faults
    finally:
        server.close()


def test_cached_dataset_matches_direct_reader_order(tmp_path):
    server, src, good, _ = _world(tmp_path, n_good=12, bad_row=False)
    out = tmp_path / "cache"
    try:
        prepare_cache(src, out, shard_rows=4, **FAST)  # completion order is scrambled by threads
    finally:
        server.close()
    ds = CachedImageDataset(out)
    direct = [(r.row_id, r.caption) for r in read_sa1b(src) if r.row_id in good]
    assert [(ds[i]["row_id"], ds[i]["caption"]) for i in range(len(ds))] == direct
    sample = ds[0]
    assert sample["pixel_values"].shape == (3, 224, 224) and sample["url"].startswith("http://127.0.0.1:")


def test_limit_takes_first_rows_and_resume_extends(tmp_path):
    server, src, good, faults = _world(tmp_path, n_good=9, bad_row=False)
    out = tmp_path / "cache"
    try:
        prepare_cache(src, out, limit=5, **FAST)
        assert all(rid < 5 for rid in cached_row_ids(out))
        assert all(rid < 5 for rid in load_failures(out))
        prepare_cache(src, out, **FAST)
        assert cached_row_ids(out) == set(good)
    finally:
        server.close()


def test_cache_refuses_other_source_and_second_writer(tmp_path):
    server, src, _, _ = _world(tmp_path, n_good=3, bad_row=False)
    out = tmp_path / "cache"
    try:
        prepare_cache(src, out, **FAST)
        other = tmp_path / "other.parquet"
        write_sa1b(other, [server.url("/img/0000.jpg")], ["x"])
        with pytest.raises(CacheError, match="不同的设置"):
            prepare_cache(other, out, **FAST)
        with _lock(out), pytest.raises(CacheError, match="另一个进程"):
            prepare_cache(src, out, **FAST)
    finally:
        server.close()


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_exact(tmp_path):
    """Kill a real `python -m llava_lib.data prepare` twice mid-run; the third run finishes the rest."""
    server, src, good, faults = _world(tmp_path, n_good=60, delay=0.04)
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "llava_lib.data", "prepare", "--src", str(src), "--out", str(out),
           "--workers", "2", "--shard-rows", "4", "--timeout", "0.5", "--retries", "2", "--no-progress",
           "--max-mb", str(MAX_BYTES / (1 << 20))]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        before: set[int] = set()
        for _ in range(2):
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 30
            target = len(shard_paths(out)) + 2
            while len(shard_paths(out)) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
            proc.stderr.close()
            ids = [rid for rid, _ in _shard_rows(out)]
            assert len(ids) == len(set(ids)) and before <= set(ids)
            before = set(ids)
        assert before and before < set(good)  # killed mid-run, with work done
        hits_before = {good[rid][0]: server.hits[good[rid][0]] for rid in before}

        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        assert "缓存目录" in done.stdout.decode()
        rows = _shard_rows(out)
        ids = [rid for rid, _ in rows]
        assert len(ids) == len(set(ids)) and set(ids) == set(good)  # each good row exactly once
        assert dict(rows) == {rid: cap for rid, (_, cap) in good.items()}
        assert {rid: r["reason"] for rid, r in load_failures(out).items()} == faults
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no torn shard left behind
        # Rows already in complete shards were not fetched again.
        assert all(server.hits[path] == n for path, n in hits_before.items())
    finally:
        server.close()


def test_ctrl_c_keeps_fetched_rows(tmp_path):
    """SIGINT (Ctrl-C): the buffered rows are written as a shard, exit code 130, a Chinese note on stderr."""
    # 200 rows at 40 ms each on 2 workers: ~4 s of fetching, so the signal lands mid-run on a slow machine too.
    server, src, good, _ = _world(tmp_path, n_good=200, delay=0.04, bad_row=False)
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "llava_lib.data", "prepare", "--src", str(src), "--out", str(out),
           "--workers", "2", "--shard-rows", "1000", "--timeout", "0.5", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        # Ctrl-C in a terminal: SIGINT at its default. A test run started in the background (`cmd &` in a script)
        # inherits SIGINT *ignored*, and Python then never raises KeyboardInterrupt; the child runs to the end, exit 0.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 30
        # The first 8 requests are the download estimate's sample; then 6 fetches into the cache.
        while sum(server.hits.values()) < 8 + 6 and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err.decode()
        assert "已中断" in err.decode()
        ids = [rid for rid, _ in _shard_rows(out)]
        assert ids and len(ids) == len(set(ids)) and set(ids) < set(good)
    finally:
        server.close()


def test_cli_help_is_chinese(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "用法" in text and "缓存" in text and "--limit" in text and "--workers" in text
    assert text.startswith("用法：python -m llava_lib.data prepare ")  # the heading once, not inside the prog name
    assert main(["prepare"]) == 1
    assert "错误" in capsys.readouterr().err


def test_cli_profile_mini_maps_urls_to_images(tmp_path, monkeypatch):
    """--profile mini: data_root -> cache_dir/train, eval_data_root -> cache_dir/eval, URLs read from images/."""
    from llava_lib import config
    from llava_lib.data.cli import MINI_URL_PREFIX

    for var in config.ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("LLAVA_CONFIG", raising=False)
    monkeypatch.setenv("LLAVA_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    mini = tmp_path / "home" / "mini"
    jpegs, caps = scene_jpegs(5, 7), scene_captions(5, 7)
    for split, name, idx in (("train", "sa1b", range(3)), ("eval", "sa1b_eval", range(3, 5))):
        (mini / "images" / split).mkdir(parents=True)
        (mini / name / "data").mkdir(parents=True)
        for i in idx:
            (mini / "images" / split / f"{i:06d}.jpg").write_bytes(jpegs[i])
        write_sa1b(mini / name / "data" / f"{split}-00000-of-00001.parquet",
                   [f"{MINI_URL_PREFIX}{split}/{i:06d}.jpg" for i in idx], [caps[i] for i in idx], form="literal")
    assert main(["prepare", "--profile", "mini", "--workers", "2", "--no-progress"]) == 0
    assert [s["caption"] for s in CachedImageDataset(mini / "cache" / "train", transform=None)] == caps[:3]
    assert [s["caption"] for s in CachedImageDataset(mini / "cache" / "eval", transform=None)] == caps[3:]


def test_mini_url_prefix_matches_mini_world():
    mini = pytest.importorskip("llava_lib.mini")
    if not hasattr(mini, "MINI_URL_BASE"):
        pytest.skip("llava_lib.mini.MINI_URL_BASE not defined yet")
    from llava_lib.data.cli import MINI_URL_PREFIX

    assert MINI_URL_PREFIX.rstrip("/") == mini.MINI_URL_BASE.rstrip("/")


def _plain_world(tmp_path, shard_sizes=(4, 4, 4), delay=0.0, same_image=False):
    """A server with one good image per row and an SA1B source split into shards of the given sizes."""
    n = sum(shard_sizes)
    jpegs, caps = scene_jpegs(n, 11), scene_captions(n, 11)
    if same_image:
        jpegs = [jpegs[0]] * n
    server = ImageServer({f"/p/{i:04d}.jpg": j for i, j in enumerate(jpegs)}, delay=delay).start()
    data = tmp_path / "src" / "data"
    data.mkdir(parents=True)
    first = 0
    for k, size in enumerate(shard_sizes):
        rows = range(first, first + size)
        write_sa1b(data / f"train-{k:05d}-of-{len(shard_sizes):05d}.parquet",
                   [server.url(f"/p/{i:04d}.jpg") for i in rows], [caps[i] for i in rows])
        first += size
    return server, tmp_path / "src", jpegs, caps


def test_estimate_counts_rows_and_times_a_sample(tmp_path):
    from llava_lib.data import estimate_download

    server, src, jpegs, _ = _plain_world(tmp_path, (20, 20), delay=0.1, same_image=True)
    out = tmp_path / "cache"
    try:
        est = estimate_download(src, out, workers=4, sample=8)
        assert est.rows_in_range == 40 and est.todo == 40 and est.sampled == 8 and not est.failed
        assert sum(server.hits.values()) == 8 and max(server.hits.values()) == 1  # 8 distinct rows, fetched once
        assert est.mean_bytes == len(jpegs[0]) and est.total_bytes == 40 * len(jpegs[0])
        assert est.eta_s >= 40 * 0.1 / 4 * 0.9  # each sampled request took the server's 0.1 s at least
        text = est.summary()
        assert "估" in text and "40 行" in text and "4 个并发" in text
        assert not out.exists()  # estimating writes nothing

        prepare_cache(src, out, limit=10, **FAST)
        hits = dict(server.hits)
        again = estimate_download(src, out, workers=4, sample=8)
        assert again.todo == 30
        fetched_again = {p for p in server.hits if server.hits[p] != hits.get(p, 0)}
        assert fetched_again and all(int(p[3:7]) >= 10 for p in fetched_again)  # only rows not cached yet
    finally:
        server.close()


def test_estimate_reports_expired_links(tmp_path):
    from llava_lib.data import estimate_download
    from llava_lib.data.fetch import REFRESH_LINKS_CMD
    from fakes import Fault

    jpegs = scene_jpegs(1, 2)
    with ImageServer({"/ok.jpg": jpegs[0]}, {"/old.jpg": Fault("status", status=403)}) as srv:
        src = write_sa1b(tmp_path / "s.parquet", [srv.url("/old.jpg")] * 3 + [srv.url("/ok.jpg")], ["a", "b", "c", "d"])
        est = estimate_download(src, tmp_path / "cache", sample=8)
    assert est.sampled == 4 and est.failed == {"http_403": 3} and len(est.sizes) == 1
    assert REFRESH_LINKS_CMD in est.summary() and "过期" in est.summary()


def test_cli_dry_run_estimates_and_fetches_nothing(tmp_path, capsys):
    server, src, _, _ = _plain_world(tmp_path, (6, 6))
    out = tmp_path / "cache"
    try:
        assert main(["prepare", "--src", str(src), "--out", str(out), "--dry-run", "--no-progress"]) == 0
        assert sum(server.hits.values()) == 8  # the sample only
    finally:
        server.close()
    text = capsys.readouterr().out
    assert "估算" in text and "12 行" in text and "--dry-run" in text
    assert not shard_paths(out)


def test_cli_full_profile_holds_out_the_last_shard_for_eval(tmp_path, monkeypatch, capsys):
    """--profile full without an eval directory: eval = the first --eval-limit rows of the last shard, and the
    training cache reads the other shards only (the course's held-out evaluation)."""
    from llava_lib import config

    for var in config.ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("LLAVA_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    server, src, _, caps = _plain_world(tmp_path, (4, 3, 5))
    monkeypatch.setenv("LLAVA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLAVA_DATA_ROOT", str(src))
    monkeypatch.setenv("LLAVA_CACHE_DIR", str(tmp_path / "cache"))
    try:
        assert main(["prepare", "--profile", "full", "--eval-limit", "3", "--workers", "2", "--no-progress"]) == 0
    finally:
        server.close()
    assert "验证集" in capsys.readouterr().out
    train = CachedImageDataset(tmp_path / "cache" / "train", transform=None)
    evals = CachedImageDataset(tmp_path / "cache" / "eval", transform=None)
    assert [s["caption"] for s in train] == caps[:7]
    assert [s["caption"] for s in evals] == caps[7:10]
