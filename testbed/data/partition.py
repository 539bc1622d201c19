"""Seeded partitioners that split a training set among federated clients.

A partition is stored in CSR form (one index array plus offsets), so memory is O(samples + clients)
and 100,000 clients cost two int64 arrays. Every scheme is vectorised numpy with no per-client loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LABEL_PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards")
"""The schemes that need only the labels (by-key also needs a key per sample)."""
PARTITIONS: tuple[str, ...] = (*LABEL_PARTITIONS, "by-key")


class PartitionError(ValueError):
    """Invalid partition request; the one-line message names the field and what is allowed."""


@dataclass(frozen=True, eq=False)
class Partition:
    """Sample indices of every client: client c owns ``indices[offsets[c]:offsets[c + 1]]``."""

    indices: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        if (
            self.offsets.ndim != 1
            or len(self.offsets) < 2
            or self.offsets[0] != 0
            or self.offsets[-1] != len(self.indices)
            or np.any(np.diff(self.offsets) < 0)
        ):
            raise PartitionError("partition.offsets: must start at 0, never decrease and end at len(indices)")

    @property
    def num_clients(self) -> int:
        """How many clients the partition has."""
        return len(self.offsets) - 1

    def client(self, c: int) -> np.ndarray:
        """The sample indices client ``c`` owns (a view, not a copy)."""
        if not 0 <= c < self.num_clients:
            raise IndexError(f"partition.client: {c} is out of range [0, {self.num_clients})")
        return self.indices[self.offsets[c] : self.offsets[c + 1]]

    def sizes(self) -> np.ndarray:
        """The number of samples of every client, shape ``(num_clients,)``."""
        return np.diff(self.offsets)

    def owners(self) -> np.ndarray:
        """The client of every entry of ``indices``, shape ``(len(indices),)``."""
        return np.repeat(np.arange(self.num_clients, dtype=np.int64), self.sizes())

    def label_counts(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """Per-client class histogram, shape ``(num_clients, num_classes)``."""
        flat = self.owners() * num_classes + labels[self.indices]
        counts = np.bincount(flat, minlength=self.num_clients * num_classes)
        return counts.reshape(self.num_clients, num_classes)


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_samples: int = 1,
    keys: np.ndarray | None = None,
) -> Partition:
    """Split the samples with class ``labels`` among ``num_clients`` clients with ``scheme``.

    ``iid``: an even split of a random permutation. ``dirichlet``: per-class client shares drawn from
    Dir(alpha), then topped up so every client holds at least ``min_samples``. ``shards``: label-sorted
    shards, ``shards_per_client`` random ones per client. ``by-key``: each client holds the samples of one
    value of ``keys`` (a writer, a user; see ``_key_owners``). Same inputs and seed, same partition.
    """
    labels = _check(labels, num_clients, scheme, alpha, shards_per_client, min_samples)
    rng = np.random.default_rng(seed)
    if scheme == "by-key":
        return _from_owners(_key_owners(keys, len(labels), num_clients, min_samples, rng), num_clients, rng)
    if scheme == "iid":
        n = len(labels)
        offsets = np.arange(num_clients + 1, dtype=np.int64) * n // num_clients
        return Partition(rng.permutation(n).astype(np.int64), offsets)
    if scheme == "dirichlet":
        owner = _dirichlet_owners(labels, num_clients, alpha, rng)
        owner = _top_up(owner, num_clients, min_samples, rng)
    else:
        owner = _shard_owners(labels, num_clients, shards_per_client, rng)
        smallest = int(np.bincount(owner, minlength=num_clients).min())
        if smallest < min_samples:
            raise PartitionError(
                f"partition.min_samples: shards leave a client only {smallest} samples, "
                f"below min_samples={min_samples}; lower shards_per_client or min_samples"
            )
    return _from_owners(owner, num_clients, rng)


def _check(
    labels: np.ndarray, num_clients: int, scheme: str, alpha: float, shards_per_client: int, min_samples: int
) -> np.ndarray:
    """Validate the request, returning the labels as an int64 vector."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise PartitionError("partition.labels: must be a 1-D array of non-negative integer class ids")
    n = len(labels)
    if scheme not in PARTITIONS:
        raise PartitionError(f"partition.scheme: unknown {scheme!r}; allowed: {', '.join(PARTITIONS)}")
    if num_clients < 1:
        raise PartitionError(f"partition.num_clients: must be >= 1, got {num_clients}")
    if num_clients > n:
        raise PartitionError(f"partition: {num_clients} clients but only {n} training samples")
    if min_samples < 0 or num_clients * min_samples > n:
        raise PartitionError(
            f"partition.min_samples: must be in [0, {n // num_clients}] for {num_clients} "
            f"clients over {n} samples, got {min_samples}"
        )
    if scheme == "dirichlet" and not alpha > 0:
        raise PartitionError(f"partition.alpha: must be > 0, got {alpha}")
    if scheme == "shards" and not 1 <= shards_per_client <= n // num_clients:
        raise PartitionError(
            f"partition.shards_per_client: must be in [1, {n // num_clients}] so that "
            f"{num_clients} clients' shards fit {n} samples, got {shards_per_client}"
        )
    return labels.astype(np.int64, copy=False)


def _dirichlet_owners(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Owner of every sample: class k is cut among clients by shares p_k ~ Dir(alpha * 1).

    Within class k (n_k samples, shuffled) client c receives positions
    ``[round(n_k * P_k,c-1), round(n_k * P_k,c))`` where P_k is the cumulative sum of p_k.
    """
    n = len(labels)
    order = np.lexsort((rng.random(n), labels))
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    shares = rng.dirichlet(np.full(num_clients, alpha), size=len(classes))
    cuts = np.rint(np.cumsum(shares, axis=1) * counts[:, None]).astype(np.int64)
    cuts[:, -1] = counts
    flat_cuts = (cuts + starts[:, None]).ravel()
    slot = np.searchsorted(flat_cuts, np.arange(n), side="right")
    owner = np.empty(n, dtype=np.int64)
    owner[order] = slot % num_clients
    return owner


def _top_up(owner: np.ndarray, num_clients: int, min_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Move random samples from the largest clients to those below ``min_samples``.

    With deficit D = sum_c max(0, min_samples - size_c), the donors are levelled from the top: the
    largest integer L with sum_c min(size_c, L) <= N - D caps every client at L (a random few keep
    L + 1 so the total is exact). L >= min_samples whenever N >= num_clients * min_samples, so no donor
    drops below the minimum; the freed samples fill the deficits.
    """
    sizes = np.bincount(owner, minlength=num_clients)
    deficit = np.maximum(min_samples - sizes, 0)
    total_deficit = int(deficit.sum())
    if total_deficit == 0:
        return owner
    target = len(owner) - total_deficit
    low, high = min_samples, int(sizes.max())
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if np.minimum(sizes, mid).sum() <= target else (low, mid - 1)
    keep = np.minimum(sizes, low)
    extra = target - int(keep.sum())
    above = np.flatnonzero(sizes > low)
    keep[rng.choice(above, size=extra, replace=False)] += 1
    order = np.lexsort((rng.random(len(owner)), owner))
    sorted_owner = owner[order]
    rank = np.arange(len(owner)) - np.searchsorted(sorted_owner, sorted_owner, side="left")
    moved = order[rank >= keep[sorted_owner]]
    owner = owner.copy()
    owner[moved] = rng.permutation(np.repeat(np.arange(num_clients), deficit))
    return owner


def _shard_owners(labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator) -> np.ndarray:
    """Owner of every sample: sort by label, cut into even shards, deal shards to clients at random."""
    n = len(labels)
    num_shards = num_clients * shards_per_client
    order = np.lexsort((rng.random(n), labels))
    shard_of_position = np.arange(n, dtype=np.int64) * num_shards // n
    client_of_shard = rng.permutation(num_shards) // shards_per_client
    owner = np.empty(n, dtype=np.int64)
    owner[order] = client_of_shard[shard_of_position]
    return owner


def _key_owners(
    keys: np.ndarray | None, samples: int, num_clients: int, min_samples: int, rng: np.random.Generator
) -> np.ndarray:
    """Owner of every sample under by-key: one key per client, -1 for the samples of keys left out.

    Keys holding fewer than ``min_samples`` samples are left out. Of the rest, a seeded random choice of
    ``num_clients`` keys is used, client c taking the c-th chosen key; with more keys than clients the
    other keys' samples are left out, with fewer it is an error.
    """
    if keys is None:
        raise PartitionError("partition.key: the by-key scheme needs a key for every training sample")
    keys = np.asarray(keys)
    if keys.ndim != 1 or len(keys) != samples:
        raise PartitionError(f"partition.key: expected one key per training sample ({samples}), got shape {keys.shape}")
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    eligible = np.flatnonzero(counts >= min_samples)
    if len(eligible) < num_clients:
        held = f" with at least min_samples={min_samples} samples" if min_samples > 1 else ""
        raise PartitionError(
            f"partition: by-key gives each client one key's samples, but there are {len(eligible)} keys{held} "
            f"for {num_clients} clients; configure at most {len(eligible)} clients"
        )
    client_of_key = np.full(len(counts), -1, dtype=np.int64)
    client_of_key[rng.choice(eligible, size=num_clients, replace=False)] = np.arange(num_clients)
    owner: np.ndarray = client_of_key[inverse.reshape(-1)]
    return owner


def _from_owners(owner: np.ndarray, num_clients: int, rng: np.random.Generator) -> Partition:
    """CSR partition from each sample's owner (-1: no client), samples in random order within every client."""
    kept = np.flatnonzero(owner >= 0)
    order = np.lexsort((rng.random(len(kept)), owner[kept]))
    indices = kept[order].astype(np.int64)
    offsets = np.zeros(num_clients + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner[kept], minlength=num_clients), out=offsets[1:])
    return Partition(indices, offsets)
