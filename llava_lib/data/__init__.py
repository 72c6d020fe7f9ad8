"""SA1B-Dense-Caption data: reader, fault-tolerant fetch, fetch-once image cache, datasets and samplers.

Typical use::

    prepare_cache(src, out)        # once: python -m llava_lib.data prepare --profile full --limit 100000
    ds = CachedImageDataset(out)   # {"pixel_values", "caption", "url", "row_id"}
    dl = DataLoader(ds, batch_sampler=LengthGroupedSampler(ds.lengths, 16, seed=0),
                    collate_fn=make_collate(tokenizer), num_workers=8)
"""
from .cache import (CacheError, CacheReport, DownloadEstimate, cached_row_ids, estimate_download, load_failures,
                    prepare_cache, shard_paths)
from .cli import main
from .dataset import CachedImageDataset, DirectDataset, SkippedSample, collate_images, make_collate
from .examples import ExportReport, export_examples
from .fetch import FetchError, decode_image, fetch_bytes, fetch_image, reason_label, rewrite_url
from .reader import DataFormatError, ReadStats, Row, SA1BRows, parse_cap_seg, read_sa1b
from .sampler import LengthGroupedSampler

__all__ = [
    "CacheError", "CacheReport", "CachedImageDataset", "DataFormatError", "DirectDataset", "DownloadEstimate",
    "ExportReport", "FetchError", "LengthGroupedSampler", "ReadStats", "Row", "SA1BRows", "SkippedSample",
    "cached_row_ids", "collate_images", "decode_image", "estimate_download", "export_examples", "fetch_bytes",
    "fetch_image", "load_failures", "main", "make_collate", "parse_cap_seg", "prepare_cache", "reason_label",
    "read_sa1b", "rewrite_url", "shard_paths",
]
