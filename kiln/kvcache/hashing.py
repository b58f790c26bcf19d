"""Content hashes of full KV-cache blocks, the keys of prefix reuse.

Rules:
- Only FULL blocks are hashed; a partial block's KV is still changing.
- A block's hash chains its parent's (the previous block's) hash with its own token ids and the salt,
  so equal tokens after a different prefix give a different hash: a block's KV depends on every
  token before it, not only its own.
- The hash is SHA-256 over a canonical byte encoding, truncated to 128 bits. It is the same in every
  process and on every run (Python's `hash()` is salted per process and would make hashes useless
  across restarts or workers). 128 bits make accidental collisions practically impossible; the
  manager still compares token ids on every hit, so even a collision cannot serve wrong KV.
- The salt stands for anything besides the tokens that changes KV (model, adapter, a tenant's cache
  isolation); caches built with different salts never share a block.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence

HASH_BYTES = 16
# Versioned so a change of encoding can never match hashes made by an older encoding.
_DOMAIN = b"kiln.kvcache.block.v1\x00"


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int], salt: str = "") -> int:
    """Hash of one full block: SHA-256(domain, salt, parent hash or "root", token ids) as a 128-bit int."""
    digest = hashlib.sha256(_DOMAIN)
    salt_bytes = salt.encode("utf-8")
    # Length prefixes keep the encoding unambiguous (salt "a" + tokens never equals salt "" + other bytes).
    digest.update(len(salt_bytes).to_bytes(8, "little"))
    digest.update(salt_bytes)
    if parent_hash is None:
        digest.update(b"\x00")
    else:
        digest.update(b"\x01" + parent_hash.to_bytes(HASH_BYTES, "little"))
    digest.update(len(token_ids).to_bytes(8, "little"))
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(digest.digest()[:HASH_BYTES], "little")


def iter_block_hashes(
    token_ids: Sequence[int], block_size: int, salt: str = "", max_blocks: int | None = None
) -> Iterator[int]:
    """Yield the chained hashes of token_ids' full blocks, first block first, lazily.

    Stops after `max_blocks` blocks when given, so a caller that stops at the first cache miss
    hashes no further than it looks.
    """
    num_full = len(token_ids) // block_size
    if max_blocks is not None:
        num_full = min(num_full, max_blocks)
    parent: int | None = None
    for i in range(num_full):
        parent = hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size], salt)
        yield parent


def extend_block_hashes(
    block_hashes: list[int], token_ids: Sequence[int], block_size: int, num_full_blocks: int, salt: str = ""
) -> None:
    """Append to block_hashes (the chain of token_ids' first len(block_hashes) blocks) up to num_full_blocks.

    Lets a request keep its hashes between steps and hash each block once, when it becomes full.
    """
    if num_full_blocks * block_size > len(token_ids):
        raise ValueError(f"{num_full_blocks} full blocks need {num_full_blocks * block_size} tokens")
    parent = block_hashes[-1] if block_hashes else None
    for i in range(len(block_hashes), num_full_blocks):
        parent = hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size], salt)
        block_hashes.append(parent)
