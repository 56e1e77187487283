"""Hash tables in files: build once, train with ``--hash-file``, bring your own.

    save_table_file("clustered.json", table, "clustered", num_experts=16, dictionary=d)
    table = load_table_file("clustered.json", d, "clustered", num_experts=16, num_hashes=1)

A table file is one JSON object (see ``docs/hash_tables.md``)::

    {
      "format": "fairseq-hash-table", "version": 1,
      "type": "clustered",             # a --hash-type; says how rows are looked up
      "num_experts": 16,               # K: every entry is in [0, K)
      "num_hashes": 1,                 # N of MultiHash (--hash-count)
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
"""
import json
import os

import torch

from .errors import HashConfigError
from .hashing import HASH_REGISTRY, dictionary_fingerprint

FORMAT, VERSION = "fairseq-hash-table", 1


def fingerprint_hex(dictionary) -> str:
    return f"{dictionary_fingerprint(dictionary):015x}"


def save_table_file(path, table: torch.Tensor, hash_type: str, num_experts: int, dictionary,
                    source: str = ""):
    """Write ``table [R, N * columns_per_hash]`` with what it was built for."""
    cls = HASH_REGISTRY[hash_type]
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "type": hash_type,
        "num_experts": int(num_experts),
        "num_hashes": table.size(1) // cls.columns_per_hash,
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


def load_table_file(path, dictionary, hash_type: str, num_experts: int, num_hashes: int):
    """The table ``[R, N * columns_per_hash]`` of a file built for this model, or an error."""
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
    if int(doc["num_experts"]) != num_experts:
        raise HashConfigError(
            f"--hash-file {path} was built for {doc['num_experts']} experts but "
            f"--hash-experts is {num_experts}; rebuild the table or pass "
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
    cls = HASH_REGISTRY[hash_type]
    try:
        table = torch.tensor(doc["table"], dtype=torch.long)
    except (TypeError, ValueError) as e:
        raise HashConfigError(f"--hash-file {path}: \"table\" is not a list of integer rows ({e})") from None
    columns = num_hashes * cls.columns_per_hash
    rows = len(dictionary) if cls.token_rows else None
    if table.dim() != 2 or table.size(1) != columns or (rows and table.size(0) != rows) \
            or table.size(0) == 0:
        raise HashConfigError(
            f"--hash-file {path}: table is {list(table.shape)}, expected "
            f"[{rows or 'R'}, {columns}] for {num_hashes} {hash_type} hash(es)"
        )
    if int(table.min()) < 0 or int(table.max()) >= num_experts:
        raise HashConfigError(
            f"--hash-file {path}: entries must lie in [0, {num_experts}), found "
            f"{int(table.min())}..{int(table.max())}"
        )
    return table
