"""Hash tables in files: build once, train with ``--hash-file``, bring your own.

    save_table_file("clustered.json", table, "clustered", total_experts=16, dictionary=d)
    table = load_table_file("clustered.json", d, "clustered", total_experts=16, num_hashes=1)

A table file is one JSON object (see ``docs/hash_tables.md``)::

    {
      "format": "fairseq-hash-table", "version": 1,
      "type": "clustered",             # a --hash-type; says how rows are looked up
      "num_experts": 16,               # K: every entry is in [0, K)
      "num_hashes": 1,                 # N of MultiHash (--hash-count)
      "topk": 1,                       # k experts per token (--hash-topk); 1 if absent
      "dictionary_size": 2000,         # V, rows of a token table
      "dictionary_fingerprint": "0a1b2c3d4e5f607",
      "source": "free text: how the table was made",
      "table": [[3], [0], [15], ...]   # R rows x (N, or 2N for bigram) columns
    }

Row i of a token table belongs to dictionary index i (fairseq's order: ``<s>``,
``<pad>``, ``</s>``, ``<unk>``, then the lines of dict.txt). The fingerprint
is the first 15 hex digits of the SHA-1 of the dictionary's symbols joined by
newlines (:func:`hashing.dictionary_fingerprint`); ``fairseq-hash-table
fingerprint --data DATA-BIN`` prints it. Loading checks every field against the
model being built and refuses a mismatch with a one-line error naming the file.

A table made elsewhere (DeepSeek-V4's ``tid2eid``, a token -> k experts
tensor) is imported from a ``.pt`` or ``.safetensors`` file holding an
integer tensor ``[V, k]`` under the key ``tid2eid`` (or one key ending in
``.tid2eid``; a ``.pt`` may also hold the bare tensor): see
:func:`load_tid2eid`. Its rows are checked against the dictionary's size only.
"""
import json
import os

import torch

from .errors import HashConfigError
from .hashing import HASH_REGISTRY, dictionary_fingerprint

FORMAT, VERSION = "fairseq-hash-table", 1
TENSOR_SUFFIXES = (".pt", ".safetensors")
TID2EID = "tid2eid"


def fingerprint_hex(dictionary) -> str:
    return f"{dictionary_fingerprint(dictionary):015x}"


def save_table_file(path, table: torch.Tensor, hash_type: str, total_experts: int, dictionary,
                    source: str = "", topk: int = 1):
    """Write ``table [R, N * columns_per_hash]`` (or ``[R, k * columns_per_hash]``)."""
    cls = HASH_REGISTRY[hash_type]
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "type": hash_type,
        "num_experts": int(total_experts),  # the format's key since version 1
        "num_hashes": table.size(1) // cls.columns_per_hash // topk,
        "topk": int(topk),
        "dictionary_size": len(dictionary),
        "dictionary_fingerprint": fingerprint_hex(dictionary),
        "source": source,
        "table": table.tolist(),
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        # one row a line: the file stays readable and diffable
        body = json.dumps({k: v for k, v in doc.items() if k != "table"}, indent=1)[:-2]
        f.write(body + ',\n "table": [\n')
        f.write(",\n".join("  " + json.dumps(row) for row in doc["table"]))
        f.write("\n ]\n}\n")
    os.replace(tmp, path)


def read_table_file(path):
    """The raw JSON object of a table file, checked for its format only."""
    if not os.path.isfile(path):
        raise HashConfigError(f"--hash-file {path}: no such file")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise HashConfigError(f"--hash-file {path}: not a JSON table file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise HashConfigError(
            f"--hash-file {path}: not a hash table file (expected \"format\": \"{FORMAT}\"; "
            f"see docs/hash_tables.md)"
        )
    if doc.get("version") != VERSION:
        raise HashConfigError(
            f"--hash-file {path}: version {doc.get('version')!r} is not supported (valid: {VERSION})"
        )
    missing = [k for k in ("type", "num_experts", "num_hashes", "dictionary_fingerprint", "table")
               if k not in doc]
    if missing:
        raise HashConfigError(f"--hash-file {path}: missing field(s) {', '.join(missing)}")
    return doc


def load_table_file(path, dictionary, hash_type: str, total_experts: int, num_hashes: int,
                    topk: int = 1):
    """The table ``[R, N * columns_per_hash]`` (or ``[R, k * ...]``) of a file, or an error."""
    if path.endswith(TENSOR_SUFFIXES):
        return load_tid2eid(path, dictionary, hash_type, total_experts, topk)
    doc = read_table_file(path)
    if doc["type"] != hash_type:
        raise HashConfigError(
            f"--hash-file {path} holds a {doc['type']!r} table but --hash-type is "
            f"{hash_type!r}; pass --hash-type {doc['type']}"
        )
    if doc["type"] not in HASH_REGISTRY:
        raise HashConfigError(
            f"--hash-file {path}: type {doc['type']!r} is unknown; valid: "
            f"{', '.join(sorted(HASH_REGISTRY))}"
        )
    if int(doc["num_experts"]) != total_experts:
        raise HashConfigError(
            f"--hash-file {path} was built for {doc['num_experts']} experts but "
            f"--hash-experts is {total_experts}; rebuild the table or pass "
            f"--hash-experts {doc['num_experts']}"
        )
    if doc["dictionary_fingerprint"] != fingerprint_hex(dictionary):
        raise HashConfigError(
            f"--hash-file {path} was built for another dictionary (fingerprint "
            f"{doc['dictionary_fingerprint']}, this data's dict.txt has "
            f"{fingerprint_hex(dictionary)}); rebuild it with fairseq-hash-table for this data"
        )
    if int(doc["num_hashes"]) != num_hashes:
        raise HashConfigError(
            f"--hash-file {path} holds {doc['num_hashes']} hash(es) but --hash-count is "
            f"{num_hashes}; pass --hash-count {doc['num_hashes']} or rebuild with --hashes"
        )
    if int(doc.get("topk", 1)) != topk:
        raise HashConfigError(
            f"--hash-file {path} gives {doc.get('topk', 1)} expert(s) per token but --hash-topk "
            f"is {topk}; pass --hash-topk {doc.get('topk', 1)} or rebuild with --topk"
        )
    cls = HASH_REGISTRY[hash_type]
    try:
        table = torch.tensor(doc["table"], dtype=torch.long)
    except (TypeError, ValueError) as e:
        raise HashConfigError(f"--hash-file {path}: \"table\" is not a list of integer rows ({e})") from None
    columns = num_hashes * topk * cls.columns_per_hash
    rows = len(dictionary) if cls.token_rows else None
    if table.dim() != 2 or table.size(1) != columns or (rows and table.size(0) != rows) \
            or table.size(0) == 0:
        what = f"{topk} experts a token" if topk > 1 else f"{num_hashes} {hash_type} hash(es)"
        raise HashConfigError(
            f"--hash-file {path}: table is {list(table.shape)}, expected "
            f"[{rows or 'R'}, {columns}] for {what}"
        )
    check_entries(path, table, total_experts, topk)
    return table


def check_entries(path, table: torch.Tensor, total_experts: int, topk: int):
    if int(table.min()) < 0 or int(table.max()) >= total_experts:
        raise HashConfigError(
            f"--hash-file {path}: entries must lie in [0, {total_experts}), found "
            f"{int(table.min())}..{int(table.max())}"
        )
    if topk > 1:
        repeats = (table[:, :topk].sort(dim=1).values.diff(dim=1) == 0).any(dim=1)
        if repeats.any():
            raise HashConfigError(
                f"--hash-file {path}: row {int(repeats.nonzero()[0])} names an expert twice; "
                f"each token's {topk} experts must be distinct"
            )


def read_tensor_file(path) -> dict:
    """The tensors of a ``.pt`` or ``.safetensors`` file, by name."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise HashConfigError(
                f"--hash-file {path}: reading .safetensors needs the safetensors package "
                f"(pip install safetensors), or save the table with torch.save as .pt"
            ) from None
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise HashConfigError(f"--hash-file {path}: not a safetensors file ({e})") from None
    try:
        # weights_only: a table file must not be able to run code when loaded
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors alike
        raise HashConfigError(f"--hash-file {path}: torch.load could not read it "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if isinstance(loaded, torch.Tensor):
        return {TID2EID: loaded}
    if not isinstance(loaded, dict):
        raise HashConfigError(f"--hash-file {path}: holds a {type(loaded).__name__}; expected "
                              f"a tensor or a dict with key {TID2EID!r}")
    return loaded


def load_tid2eid(path, dictionary, hash_type: str, total_experts: int, topk: int):
    """Import a token -> experts tensor ``tid2eid [V, k]`` as the table of a token hash."""
    cls = HASH_REGISTRY[hash_type]
    if not cls.token_rows or cls.columns_per_hash != 1:
        raise HashConfigError(
            f"--hash-file {path}: a {TID2EID} table maps token ids to experts; --hash-type "
            f"{hash_type} needs another table (use random, balanced, clustered or dispersed)"
        )
    tensors = read_tensor_file(path)
    names = [n for n in tensors if n == TID2EID] or [n for n in tensors
                                                     if n.endswith("." + TID2EID)]
    if len(names) != 1:
        raise HashConfigError(
            f"--hash-file {path}: expected one tensor named {TID2EID!r} (or ending in "
            f"'.{TID2EID}'), found {len(names)} among {sorted(tensors)[:5]}"
        )
    table = tensors[names[0]]
    if not isinstance(table, torch.Tensor) or table.is_floating_point() or table.is_complex() \
            or table.dtype == torch.bool:
        raise HashConfigError(f"--hash-file {path}: {names[0]} must be an integer tensor, "
                              f"found {getattr(table, 'dtype', type(table).__name__)}")
    table = table.long().reshape(table.size(0), -1) if table.dim() == 1 else table.long()
    if table.dim() != 2 or table.size(1) != topk:
        raise HashConfigError(f"--hash-file {path}: {names[0]} is {list(table.shape)}, expected "
                              f"[vocabulary, --hash-topk {topk}]")
    if table.size(0) != len(dictionary):
        raise HashConfigError(
            f"--hash-file {path}: {names[0]} has {table.size(0)} rows but the dictionary has "
            f"{len(dictionary)} symbols (dict.txt plus fairseq's specials and fillers); "
            f"one row per dictionary index is needed"
        )
    check_entries(path, table, total_experts, topk)
    return table
