"""Datasets over the cache and direct, the collates, the length-grouped sampler, export_examples."""
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fakes import ImageServer, scene_captions, scene_jpegs, standard_faults, write_sa1b

from llava_lib import process
from llava_lib.data import (CachedImageDataset, DirectDataset, LengthGroupedSampler, SkippedSample, collate_images,
                            export_examples, make_collate, prepare_cache)

pytestmark = pytest.mark.timeout(60)
MAX_BYTES = 200_000
FETCH = dict(timeout=0.5, retries=1, backoff=0.02, max_bytes=MAX_BYTES)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """10 good scenes with a 404, an HTML page and a truncated JPEG in between; and its cache."""
    tmp = tmp_path_factory.mktemp("world")
    jpegs, caps = scene_jpegs(10, 11), scene_captions(10, 11)
    server = ImageServer({f"/{i}.jpg": j for i, j in enumerate(jpegs)}, standard_faults(jpegs[0], MAX_BYTES)).start()
    urls = [server.url(f"/{i}.jpg") for i in range(10)]
    texts = list(caps)
    for pos, path in ((1, "/fault/404.jpg"), (5, "/fault/html.jpg"), (8, "/fault/truncated.jpg")):
        urls.insert(pos, server.url(path))
        texts.insert(pos, f"坏 {path}")
    src = write_sa1b(tmp / "src.parquet", urls, texts, form="struct")
    cache = tmp / "cache"
    prepare_cache(src, cache, workers=3, shard_rows=3, progress=False, **FETCH)
    good_ids = [i for i, u in enumerate(urls) if "/fault/" not in u]
    yield dict(server=server, src=src, cache=cache, caps=caps, good_ids=good_ids)
    server.close()


def test_cached_dataset_sample_and_lengths(world):
    ds = CachedImageDataset(world["cache"])
    assert len(ds) == 10 and ds.row_ids.tolist() == world["good_ids"]
    s = ds[3]
    assert set(s) == {"pixel_values", "caption", "url", "row_id"}
    assert s["pixel_values"].shape == (3, 224, 224) and s["pixel_values"].dtype == torch.float32
    assert s["caption"] == world["caps"][3] and ds.lengths[3] == len(world["caps"][3])
    assert ds[-1]["row_id"] == world["good_ids"][-1]


def test_cached_dataset_pickles_without_open_files(world):
    ds = CachedImageDataset(world["cache"])
    ds[0]
    assert "_row_group" in vars(ds)  # open files and cached row groups ...
    clone = pickle.loads(pickle.dumps(ds))
    assert "_row_group" not in vars(clone)  # ... stay in the process that opened them
    assert clone[0]["caption"] == ds[0]["caption"]


def test_cached_loader_with_workers_and_sampler(world):
    ds = CachedImageDataset(world["cache"])
    sampler = LengthGroupedSampler(ds.lengths, batch_size=4, seed=1)
    dl = DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=collate_images)
    seen = [rid for batch in dl for rid in batch["row_ids"]]
    assert sorted(seen) == world["good_ids"]


def test_direct_dataset_skips_and_counts_never_replaces(world):
    ds = DirectDataset(world["src"], **FETCH)
    assert len(ds) == 13
    dl = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_images)
    batches = list(dl)
    got = [(rid, cap) for b in batches for rid, cap in zip(b["row_ids"], b["captions"])]
    skipped = [s for b in batches for s in b["skipped"]]
    cache = CachedImageDataset(world["cache"])
    # Same rows, same captions, same order as the cache; every bad row reported once with its reason.
    assert got == [(int(r), c) for r, c in zip(cache.row_ids, cache.captions)]
    assert sorted(s.reason for s in skipped) == ["http_404", "not_image", "truncated"]
    assert len(got) + len(skipped) == len(ds)
    # In-process use counts failures too.
    assert isinstance(ds[1], SkippedSample) and ds.failures["http_404"] == 1


def test_direct_and_cached_pixels_agree(world):
    direct, cache = DirectDataset(world["src"], **FETCH), CachedImageDataset(world["cache"])
    a, b = direct[0]["pixel_values"], cache[0]["pixel_values"]
    assert (a - b).abs().mean() < 0.05  # one extra JPEG round trip at quality 90


def _tiny_tokenizer():
    """A character-level tokenizer with Qwen's special tokens and a Qwen-style chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", process.VISION_START,
                process.IMAGE_PAD, process.VISION_END]
    chars = sorted(set("".join(scene_captions(50, 0)) + process.DEFAULT_PROMPT + "abcdefghijklmnopqrstuvwxyz\n <>"))
    vocab = {t: i for i, t in enumerate(["<unk>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens(specials)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", chat_template=template)


def test_make_collate_wraps_process_collate(world):
    tok = _tiny_tokenizer()
    ds = CachedImageDataset(world["cache"])
    samples = [ds[0], SkippedSample(99, "u", "http_404", "HTTP 404"), ds[1]]
    batch = make_collate(tok, n_image_tokens=197, max_text_tokens=128)(samples)
    ref = process.collate(tok, [ds[0], ds[1]], 197, 128)
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(batch[key], ref[key])
    assert batch["pixel_values"].shape == (2, 3, 224, 224)
    assert batch["row_ids"] == [int(ds.row_ids[0]), int(ds.row_ids[1])] and len(batch["skipped"]) == 1
    assert (batch["input_ids"] == tok.convert_tokens_to_ids(process.IMAGE_PAD)).sum() == 2 * 197
    assert (batch["labels"] != process.IGNORE_INDEX).any()
    empty = make_collate(tok)([SkippedSample(1, "u", "timeout", "t")])
    assert empty["input_ids"].shape == (0, 0) and empty["pixel_values"] is None and len(empty["skipped"]) == 1


# --------------------------------------------------------------------------------------------- sampler
def _padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_sampler_covers_each_index_once_and_is_deterministic():
    lengths = np.random.default_rng(0).integers(5, 120, size=1003)
    s = LengthGroupedSampler(lengths, 16, seed=7)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(1003)) and len(batches) == len(s) == 63
    assert batches == list(LengthGroupedSampler(lengths, 16, seed=7))
    assert batches != list(LengthGroupedSampler(lengths, 16, seed=8))
    s.set_epoch(1)
    assert list(s) != batches


def test_sampler_groups_by_length_cuts_padding():
    lengths = np.random.default_rng(1).integers(5, 120, size=2048)
    grouped = list(LengthGroupedSampler(lengths, 16, seed=0))
    plain = list(LengthGroupedSampler(lengths, 16, seed=0, group_by_length=False))
    assert _padding(grouped, lengths) < 0.2 * _padding(plain, lengths)


def test_sampler_resumes_at_offset():
    lengths = list(range(100))
    full = list(LengthGroupedSampler(lengths, 8, seed=3, epoch=2))
    resumed = LengthGroupedSampler(lengths, 8, seed=3, epoch=2, start_batch=5)
    assert list(resumed) == full[5:] and len(resumed) == len(full) - 5
    resumed.set_epoch(3)  # the next epoch starts from its beginning
    assert len(list(resumed)) == len(full)


def test_sampler_shards_for_ddp():
    lengths = np.random.default_rng(2).integers(1, 50, size=203)
    per_rank = [list(LengthGroupedSampler(lengths, 8, seed=0, rank=r, world_size=3)) for r in range(3)]
    flat = [i for batches in per_rank for b in batches for i in b]
    assert len(flat) == len(set(flat))  # disjoint
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
    assert len(per_rank[0]) == len(LengthGroupedSampler(lengths, 8, rank=0, world_size=3))
    assert len(set(flat)) >= 203 - 2 * 8
    with pytest.raises(ValueError):
        LengthGroupedSampler(lengths, 8, rank=3, world_size=3)


def test_sampler_drop_last():
    s = LengthGroupedSampler(list(range(20)), 8, drop_last=True)
    assert len(s) == 2 and all(len(b) == 8 for b in s)


# --------------------------------------------------------------------------------------------- examples
def test_export_examples_layout(world, tmp_path):
    report = export_examples(world["src"], tmp_path / "ex", n=4, timeout=0.5, retries=0)
    assert report.written == 4 and report.skipped == [(1, "http_404")]
    names = sorted(p.name for p in (tmp_path / "ex").iterdir())
    assert names == ["0000.jpg", "0000.txt", "0001.jpg", "0001.txt", "0002.jpg", "0002.txt", "0003.jpg", "0003.txt"]
    assert [(tmp_path / "ex" / f"{i:04d}.txt").read_text(encoding="utf-8").strip() for i in range(4)] == \
        world["caps"][:4]
    c = Counter(p.suffix for p in (tmp_path / "ex").iterdir())
    assert c == {".jpg": 4, ".txt": 4}


def test_export_examples_cli(world, tmp_path, capsys):
    from llava_lib.data import main

    assert main(["export-examples", "--src", str(world["src"]), "--out", str(tmp_path / "ex"), "-n", "2"]) == 0
    assert "已导出 2 个样本" in capsys.readouterr().out
    assert (tmp_path / "ex" / "0001.txt").read_text(encoding="utf-8").strip() == world["caps"][1]


def test_forked_worker_does_not_reuse_parent_connections(world, monkeypatch):
    """A forked DataLoader worker must not share its parent's pooled connections: sessions are per process."""
    import os

    from llava_lib.data import fetch_image
    from llava_lib.data.fetch import _session

    fetch_image(world["server"].url("/0.jpg"), **FETCH)
    parent = _session()
    assert _session() is parent
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)  # as seen from a forked child
    assert _session() is not parent
    monkeypatch.undo()
    dl = DataLoader(DirectDataset(world["src"], **FETCH), batch_size=2, num_workers=2, collate_fn=collate_images)
    assert sum(len(b["row_ids"]) for b in dl) == 10
