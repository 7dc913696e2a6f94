"""The KV cache of the engine: a pool of fixed-size blocks per scheduler shard
(`pool`), per-request block tables and the tables of each forward pass
(`rows`), attention's view of the pool (`paged`), automatic prefix caching
(`prefix`) and the pool's size (`sizing`). See docs/architecture.md, "KV
block pool and prefix cache"."""

from amlx.kv.paged import PagedLayer, Tables, layer_views, read_views, written
from amlx.kv.pool import NULL_BLOCK, BlockPool, PoolFull, copy_blocks
from amlx.kv.prefix import KeyChain, PrefixIndex, block_keys
from amlx.kv.rows import PADDING_ROW, ShardKV, blocks_for, preemption_order
from amlx.kv.sizing import DEFAULT_BLOCK_SIZE, check_kv_cache_memory, kv_cache_bytes, make_pools

__all__ = ["PADDING_ROW", "BlockPool", "KeyChain", "DEFAULT_BLOCK_SIZE", "NULL_BLOCK", "PagedLayer", "PoolFull", "PrefixIndex", "ShardKV",
           "Tables", "block_keys", "blocks_for", "check_kv_cache_memory", "copy_blocks", "kv_cache_bytes",
           "layer_views", "make_pools", "preemption_order", "read_views", "written"]
