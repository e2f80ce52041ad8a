"""The on-disk formats: HDF5 region shards, the per-image index, stage manifests and lineage.

Every stage reads and writes features/ through this package; nothing else opens a shard by hand.
"""

from .atomic import atomic_write_bytes, atomic_write_json, sha256_file
from .fingerprint import fingerprint
from .shards import REGIONS_FORMAT, REGIONS_FORMAT_VERSION, Regions, ShardReader, ShardWriter
from .features import FeatureStore, INDEX_COLUMNS, read_features_manifest

__all__ = [
    "atomic_write_bytes", "atomic_write_json", "sha256_file", "fingerprint",
    "REGIONS_FORMAT", "REGIONS_FORMAT_VERSION", "Regions", "ShardReader", "ShardWriter",
    "FeatureStore", "INDEX_COLUMNS", "read_features_manifest",
]
