"""Clustered and dispersed tables: k-means over a trained model's token embeddings.

    table = embedding_table("dispersed", embeddings, counts, total_experts=16,
                            num_hashes=1, seed=1)          # [V, d], [V] -> [V, 1]

``clustered`` sends k-means cluster c to expert c mod K, so similar tokens
share an expert; ``dispersed`` spreads each cluster's members over different
experts. Hash m of MultiHash runs k-means from seed + m. ``fairseq-hash-table``
writes the result to a ``--hash-file``; ``hashing.py`` routes by it.
"""
import torch

from .errors import HashConfigError


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


def disperse(clusters: torch.Tensor, counts: torch.Tensor, total_experts: int,
             slots: int = 1) -> torch.Tensor:
    """Spread each cluster's members over different experts: table ``[V]``.

    Members go, most frequent first, to the lightest expert (by expected
    token count) among those holding the fewest members of their cluster so
    far. No two members of a cluster share an expert while the cluster has
    at most K members; larger ones are spread as evenly as counts allow.
    With ``slots`` > 1 (``--topk``) a member takes the first ``slots``
    experts in that order, all distinct: ``[V, slots]``.
    """
    table = torch.zeros(len(clusters), slots, dtype=torch.long)
    load = [0.0] * total_experts
    order = sorted(range(len(clusters)), key=lambda i: (-float(counts[i]), i))
    held = {}  # cluster -> members it has on each expert
    for token in order:
        mine = held.setdefault(int(clusters[token]), [0] * total_experts)
        chosen = sorted(range(total_experts), key=lambda e: (mine[e], load[e], e))[:slots]
        table[token] = torch.tensor(chosen)
        for expert in chosen:
            mine[expert] += 1
            load[expert] += float(counts[token])
    return table[:, 0] if slots == 1 else table


def nearest_clusters(points: torch.Tensor, clusters: torch.Tensor, total_experts: int,
                     slots: int) -> torch.Tensor:
    """``[V, slots]`` distinct experts: each point's own cluster, then the nearest others.

    Centres are the clusters' means; cluster c is expert c mod K, and a
    cluster whose expert a point already has is passed over.
    """
    points = points.double()
    num_clusters = int(clusters.max()) + 1
    sums = torch.zeros(num_clusters, points.size(1), dtype=points.dtype).index_add_(0, clusters, points)
    centres = sums / torch.bincount(clusters, minlength=num_clusters).clamp(min=1).unsqueeze(1)
    dist = torch.cdist(points, centres)  # [V, C]
    dist.scatter_(1, clusters.unsqueeze(1), -1.0)  # its own cluster first
    table = torch.zeros(points.size(0), slots, dtype=torch.long)
    for token, ranked in enumerate(dist.argsort(dim=1).tolist()):
        experts = list(dict.fromkeys(c % total_experts for c in ranked))
        if len(experts) < slots:
            raise HashConfigError(f"--topk {slots} needs at least {slots} clusters "
                                  f"(--clusters) on different experts")
        table[token] = torch.tensor(experts[:slots])
    return table


def embedding_table(kind, embeddings, counts, total_experts, num_hashes, seed, num_clusters=None,
                    topk=1):
    """``embeddings [V, d]``, ``counts [V]`` -> ``kind``'s table ``[V, num_hashes]``.

    With ``topk`` k > 1 (one hash): ``[V, k]``, k distinct experts a token;
    clustered gives the token's own cluster and then the nearest others,
    dispersed the first k experts of its dispersing order.
    """
    if kind not in ("clustered", "dispersed"):
        raise ValueError(f"embedding tables are clustered or dispersed, not {kind!r}")
    if topk > 1:
        clusters = kmeans(embeddings, num_clusters or total_experts, seed)
        if kind == "clustered":
            return nearest_clusters(embeddings, clusters, total_experts, topk)
        return disperse(clusters, counts, total_experts, slots=topk)
    columns = []
    for m in range(num_hashes):
        clusters = kmeans(embeddings, num_clusters or total_experts, seed + m)
        columns.append(clusters % total_experts if kind == "clustered"
                       else disperse(clusters, counts, total_experts))
    return torch.stack(columns, dim=1)
