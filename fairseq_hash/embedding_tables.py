"""Clustered and dispersed tables: k-means over a trained model's token embeddings.

    table = embedding_table("dispersed", embeddings, counts, num_experts=16,
                            num_hashes=1, seed=1)          # [V, d], [V] -> [V, 1]

``clustered`` sends k-means cluster c to expert c mod K, so similar tokens
share an expert; ``dispersed`` spreads each cluster's members over different
experts. Hash m of MultiHash runs k-means from seed + m. ``fairseq-hash-table``
writes the result to a ``--hash-file``; ``hashing.py`` routes by it.
"""
import torch


def kmeans(points: torch.Tensor, num_clusters: int, seed: int, iterations: int = 50):
    """Lloyd's k-means with k-means++ seeding: cluster id ``[V]`` of each point ``[V, d]``.

    Deterministic for a seed. An emptied cluster is re-seeded with the point
    farthest from its centre, so every cluster id in [0, num_clusters) is used
    whenever there are at least as many distinct points.
    """
    points = points.double()
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(points.size(0), (1,), generator=gen)
    centres = points[first]
    for _ in range(1, num_clusters):
        dist = torch.cdist(points, centres).min(dim=1).values ** 2
        if float(dist.sum()) == 0:
            pick = torch.randint(points.size(0), (1,), generator=gen)
        else:
            pick = torch.multinomial(dist / dist.sum(), 1, generator=gen)
        centres = torch.cat([centres, points[pick]])
    assign = torch.full((points.size(0),), -1, dtype=torch.long)
    for _ in range(iterations):
        dist = torch.cdist(points, centres)  # [V, C]
        new = dist.argmin(dim=1)
        sizes = torch.bincount(new, minlength=num_clusters)
        for c in (sizes == 0).nonzero().flatten().tolist():
            own = dist.gather(1, new.unsqueeze(1)).squeeze(1)
            own[sizes[new] <= 1] = -1  # never empty another cluster
            far = int(own.argmax())
            sizes[new[far]] -= 1
            new[far], sizes[c] = c, 1
        if torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        sizes = torch.bincount(assign, minlength=num_clusters).clamp(min=1).unsqueeze(1)
        centres = sums / sizes
    return assign


def disperse(clusters: torch.Tensor, counts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Spread each cluster's members over different experts: table ``[V]``.

    Members go, most frequent first, to the lightest expert (by expected
    token count) among those holding the fewest members of their cluster so
    far. No two members of a cluster share an expert while the cluster has
    at most K members; larger ones are spread as evenly as counts allow.
    """
    table = torch.zeros(len(clusters), dtype=torch.long)
    load = [0.0] * num_experts
    order = sorted(range(len(clusters)), key=lambda i: (-float(counts[i]), i))
    held = {}  # cluster -> members it has on each expert
    for token in order:
        mine = held.setdefault(int(clusters[token]), [0] * num_experts)
        expert = min(range(num_experts), key=lambda e: (mine[e], load[e], e))
        table[token] = expert
        mine[expert] += 1
        load[expert] += float(counts[token])
    return table


def embedding_table(kind, embeddings, counts, num_experts, num_hashes, seed, num_clusters=None):
    """``embeddings [V, d]``, ``counts [V]`` -> ``kind``'s table ``[V, num_hashes]``."""
    if kind not in ("clustered", "dispersed"):
        raise ValueError(f"embedding tables are clustered or dispersed, not {kind!r}")
    columns = []
    for m in range(num_hashes):
        clusters = kmeans(embeddings, num_clusters or num_experts, seed + m)
        columns.append(clusters % num_experts if kind == "clustered"
                       else disperse(clusters, counts, num_experts))
    return torch.stack(columns, dim=1)
