"""What a manifest claims about its shards (feature_dim, dtype, detector, fingerprint) against
what the shards hold: `prep verify` checks every shard, readers that build a model check one."""

from __future__ import annotations

from pathlib import Path

from ..errors import PrepError


def shard_claim_problems(reader, manifest: dict) -> list[str]:
    """Each disagreement between `manifest` (features/ or index/) and the open ShardReader
    `reader`, as one phrase: a hand-edited manifest must not pass."""
    found = []
    features = reader.dataset("features")
    claimed_dim = manifest.get("feature_dim", manifest.get("embed_dim"))
    attr_dim = reader.attrs.get("feature_dim")
    if claimed_dim is not None and (features.shape[1:] != (claimed_dim,)
                                    or (attr_dim is not None and int(attr_dim) != claimed_dim)):
        found.append(f"holds {features.shape[1] if features.ndim == 2 else '?'}-d features "
                     f"(attribute feature_dim {attr_dim}), the manifest says {claimed_dim!r}")
    claimed_dtype = manifest.get("dtype", (manifest.get("parameters") or {}).get("dtype"))
    if claimed_dtype is not None and claimed_dtype != str(features.dtype):
        found.append(f"features are {features.dtype}, the manifest says dtype {claimed_dtype!r}")
    name = (manifest.get("detector") or {}).get("name")
    if name is not None and reader.attrs.get("detector") != name:
        found.append(f"written by detector {reader.attrs.get('detector')!r}, the manifest says {name!r}")
    fp = reader.attrs.get("params_fingerprint")
    if fp and manifest.get("parameters_fingerprint") and fp != manifest["parameters_fingerprint"]:
        found.append("parameter fingerprint differs from the manifest's (a shard of another run)")
    return found


def refuse_false_claims(store) -> None:
    """One PrepError line when the first shard of FeatureStore `store` disagrees with its
    manifest (cheap: one shard's attributes), before a model is built from the manifest's word."""
    from .shards import ShardReader
    shards = store.manifest.get("shards") or []
    if not shards:
        return
    where = getattr(store, "location", str(store.root))  # a URL for features at a URL
    try:
        path = store.shard_path(shards[0]["path"]) if hasattr(store, "shard_path") else \
            Path(store.root) / shards[0]["path"]
        reader = ShardReader(path)
    except (OSError, ValueError) as exc:
        raise PrepError(f"{where}/{shards[0]['path']}: cannot be opened as a regions shard ({exc}); "
                        f"run `prep verify {where}`") from exc
    with reader:
        problems = shard_claim_problems(reader, store.manifest)
    if problems:
        raise PrepError(f"{where}/{shards[0]['path']}: {problems[0]} ({where}/manifest.json edited or "
                        f"damaged?); run `prep verify {where}` and re-run the stage that wrote it")
