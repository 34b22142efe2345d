"""Three byte-level text domains that every CPython install carries, split into train and validation.

- ``prose``: the English text of the language-reference topics in ``pydoc_data.topics``.
- ``code``: the standard library's own ``.py`` sources (tests, IDLE, lib2to3, turtledemo, ensurepip,
  site-packages and ``pydoc_data`` excluded, so the prose does not leak into the code domain).
- ``unicode``: ``UnicodeData.txt``-style records regenerated from :mod:`unicodedata`, one line per
  named code point, ``CODE;CHAR;NAME;category;combining;bidi;decomposition;decimal;digit;numeric;mirrored``
  (the character itself as UTF-8, so the domain has multi-byte sequences too): tabular data.

Every domain is a list of documents (topics, files, blocks of 256 code points) split by a hash of
the document's name (``crc32(name) % 10 == 0`` -> validation), so validation text comes from
documents never seen in training and the split does not depend on the order of the file system.
"""

from __future__ import annotations

import os
import sysconfig
import unicodedata
import zlib
from dataclasses import dataclass
from typing import Dict, List, Tuple

DOMAINS = ("prose", "code", "unicode")
VALIDATION_BUCKET = 0  # crc32(name) % 10 == VALIDATION_BUCKET -> validation

# Directories of the standard library (relative paths, first component or any component named so)
# that hold tests, demos, vendored wheels or the prose domain itself.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
                  "ensurepip", "pydoc_data", "__pycache__"}


@dataclass(frozen=True)
class Domain:
    name: str
    train: bytes
    val: bytes
    train_docs: int
    val_docs: int


def _is_validation(name: str) -> bool:
    return zlib.crc32(name.encode("utf-8")) % 10 == VALIDATION_BUCKET


def _split(docs: List[Tuple[str, bytes]]) -> Tuple[bytes, bytes, int, int]:
    train = [text for name, text in docs if not _is_validation(name)]
    val = [text for name, text in docs if _is_validation(name)]
    return b"".join(train), b"".join(val), len(train), len(val)


def prose_documents() -> List[Tuple[str, bytes]]:
    from pydoc_data.topics import topics

    return [(key, topics[key].encode("utf-8")) for key in sorted(topics)]


def code_documents() -> List[Tuple[str, bytes]]:
    stdlib = sysconfig.get_paths()["stdlib"]
    docs = []
    for root, dirs, files in os.walk(stdlib):
        rel = os.path.relpath(root, stdlib)
        parts = [] if rel == "." else rel.split(os.sep)
        if any(p in _EXCLUDED_DIRS or p.startswith("config-") for p in parts):
            dirs[:] = []
            continue
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    docs.append((os.path.relpath(path, stdlib).replace(os.sep, "/"), f.read()))
    return sorted(docs)


def unicode_documents() -> List[Tuple[str, bytes]]:
    blocks: Dict[int, List[str]] = {}
    for cp in range(0x110000):
        ch = chr(cp)
        name = unicodedata.name(ch, None)
        if name is None:
            continue
        line = (f"{cp:04X};{ch};{name};{unicodedata.category(ch)};{unicodedata.combining(ch)};"
                f"{unicodedata.bidirectional(ch)};{unicodedata.decomposition(ch)};{unicodedata.decimal(ch, '')};"
                f"{unicodedata.digit(ch, '')};{unicodedata.numeric(ch, '')};{'Y' if unicodedata.mirrored(ch) else 'N'}\n")
        blocks.setdefault(cp // 256, []).append(line)
    return [(f"block-{b:04X}", "".join(lines).encode("utf-8", "surrogatepass")) for b, lines in sorted(blocks.items())]


def load_domains() -> List[Domain]:
    """The three domains, in ``DOMAINS`` order."""
    out = []
    for name, docs in (("prose", prose_documents()), ("code", code_documents()), ("unicode", unicode_documents())):
        train, val, n_train, n_val = _split(docs)
        if not train or not val:
            raise RuntimeError(f"corpus domain {name!r}: empty split ({len(train)} train, {len(val)} val bytes)")
        out.append(Domain(name, train, val, n_train, n_val))
    return out
