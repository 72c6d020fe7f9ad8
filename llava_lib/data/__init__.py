"""SA1B-Dense-Caption data: reader, fault-tolerant fetch, fetch-once image cache, datasets and samplers."""
from .cache import CacheError, cached_row_ids, estimate_download, load_failures, prepare_cache, shard_paths
from .cli import export_examples, main
from .dataset import (CachedImageDataset, DirectDataset, LengthGroupedSampler, SkippedSample, collate_images,
                      make_collate)
from .fetch import FetchError, decode_image, fetch_image, reason_label
from .reader import DataFormatError, parse_cap_seg, read_sa1b

__all__ = ["CacheError", "CachedImageDataset", "DataFormatError", "DirectDataset", "FetchError", "LengthGroupedSampler",
           "SkippedSample", "cached_row_ids", "collate_images", "decode_image", "estimate_download", "export_examples",
           "fetch_image", "load_failures", "main", "make_collate", "parse_cap_seg", "prepare_cache", "reason_label",
           "read_sa1b", "shard_paths"]
