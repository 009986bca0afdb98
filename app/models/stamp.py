"""What identifies a large file cheaply, for caches made from it (a converted GGUF, a
dequantized copy): its size, mtime and a hash of its first and last MiB (the header and the
last tensors), so a file replaced by another of the same size is noticed without reading
gigabytes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

SAMPLE = 1 << 20  # bytes hashed at each end of the file


def file_stamp(path: Path) -> dict[str, Any]:
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(SAMPLE))
        if stat.st_size > SAMPLE:
            handle.seek(max(SAMPLE, stat.st_size - SAMPLE))
            digest.update(handle.read(SAMPLE))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sample_sha256": digest.hexdigest()}
