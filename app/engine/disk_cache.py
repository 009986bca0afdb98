"""The prefix cache's second tier: long prefixes' KV on disk, across restarts and evictions.

Coding agents send the same 10-30k-token system prompt and tool list every turn; after a
restart, or once the model was evicted, its KV is read back (a fraction of a second) instead
of prefilled again (minutes on a CPU). One `DiskCache` per process serves every model:

- **Keys.** An entry belongs to (model id, weights fingerprint, owner). Its prompt is indexed
  by a chain of block hashes seeded with that triple (`BLOCK` tokens a block), so a lookup is
  a few dict probes, another owner's or another model's entries can never match, and the
  manifest holds no token ids and no raw owner.
- **Weights identity.** `weights_fingerprint`: the names, sizes and mtimes of the model's
  files plus the loaded parameters' names, shapes and dtypes. Cheap (no weight is read; a
  content digest would read tens of GB at every load) and safe in the direction that
  matters: a changed file changes its mtime. Entries of a model id with another
  fingerprint are deleted when the model is loaded.
- **Integrity.** Each file's sha256 is in the manifest; a file of the wrong size or whose bytes
  (as loaded) hash differently is logged, deleted and never served.
- **A budget that holds.** `max_bytes` bounds the entry files, temporary ones included: room is
  made (least recently used first) before a file is created.
- **Off the engine thread.** Files are written by a writer thread; the engine thread only
  hands over views of arrays that are already evaluated. Reads happen on the engine thread
  (MLX loads there), when they save a prefill.
- **One process per directory**, held by a lock file; a second gateway on the same cache dir
  runs without the disk tier (and says so).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import threading
import time
import uuid
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from app import metrics
from app.engine import kvfile

log = structlog.get_logger(__name__)

BLOCK = 64  # tokens per indexed block: prefixes match at this granularity, then exactly
MANIFEST = "manifest.json"
MAX_PENDING = 2  # writes queued at once; more are skipped (their KV is in memory anyway)
# A prefix is written only when it adds at least this many tokens to what the disk holds
# for its owner: a turn's few generated tokens are not worth another copy of the whole file.
MIN_NEW_TOKENS = 256


@dataclass
class Entry:
    model: str
    fingerprint: str
    owner: str  # sha256 of the owner: the manifest names no key
    tokens: int
    size: int
    digest: str
    blocks: list[str]  # chain hashes of each full BLOCK of the prefix
    used: float  # last write or hit (time.time()): the LRU order


@dataclass
class Candidate:
    """The disk entry sharing the longest indexed prefix with a prompt."""

    id: str
    matched: int  # tokens known equal (whole blocks); the file may share more


def weights_fingerprint(path: Path, model: Any = None, extra: str = "") -> str:
    """Identity of the weights at `path` (a folder or a file), without reading them; `extra`
    names anything else that shapes the computed KV (e.g. the CPU layout switch)."""
    digest = hashlib.sha256(extra.encode())
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if model is not None:  # what was loaded: a dequantized or converted copy keys apart
        from mlx.utils import tree_flatten

        for name, value in tree_flatten(model.parameters()):
            digest.update(f"{name}\0{tuple(value.shape)}\0{value.dtype}\n".encode())
    from importlib.metadata import version

    digest.update(f"mlx-lm {version('mlx-lm')}".encode())
    return digest.hexdigest()[:32]


def block_hashes(seed: str, tokens: list[int]) -> list[str]:
    """The chain hash after each full block: equal at block i <=> equal first i*BLOCK tokens
    (and the same model, weights and owner, which seed the chain)."""
    out: list[str] = []
    state = hashlib.sha256(seed.encode()).digest()
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        state = hashlib.sha256(state + array("i", tokens[start:start + BLOCK]).tobytes()).digest()
        out.append(state.hex()[:32])
    return out


class DiskCache:
    """Every model's disk tier in `root`. Thread-safe: the engine thread looks up, loads and
    hands over writes; the writer thread writes and evicts."""

    def __init__(self, root: Path, max_bytes: int, *, min_tokens: int = 1024) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.min_tokens = max(min_tokens, BLOCK)
        self._lock = threading.RLock()
        self._entries: dict[str, Entry] = {}
        self._index: dict[str, set[str]] = {}  # block hash -> ids of entries holding it
        self._used = 0  # bytes of entry files, plus the one being written
        self._jobs: queue.Queue[tuple[str, Entry, kvfile.Blob] | None] = queue.Queue()
        self._pending: dict[str, Entry] = {}  # handed over, not yet written
        self._dirty = False
        self._lockfile: Any = None
        self._closing = threading.Event()
        self.enabled = max_bytes > 0 and self._open()
        self._writer = threading.Thread(target=self._write_loop, name="kv-disk-writer",
                                        daemon=True)
        if self.enabled:
            self._writer.start()

    # --- opening -------------------------------------------------------------------------------

    def _open(self) -> bool:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = (self.root / "lock").open("a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                log.warning("disk prefix cache in use by another process: off in this one",
                            path=str(self.root))
                return False
            self._lockfile = handle
            self._load_manifest()
        except OSError as error:
            log.warning("disk prefix cache unavailable: off", path=str(self.root),
                        error=repr(error))
            return False
        return True

    def _load_manifest(self) -> None:
        path = self.root / MANIFEST
        raw: dict[str, Any] = {}
        if path.exists():
            try:
                raw = json.loads(path.read_text())["entries"]
                entries = {key: Entry(**value) for key, value in raw.items()}
            except (ValueError, KeyError, TypeError) as error:
                log.warning("disk prefix cache manifest unreadable: starting empty",
                            error=repr(error))
                entries = {}
        else:
            entries = {}
        for key, entry in entries.items():
            file = self._file(key)
            if file.is_file() and file.stat().st_size == entry.size:
                self._add(key, entry)
            elif file.exists():
                log.warning("disk prefix cache file has the wrong size: dropped", file=file.name)
        for file in self.root.iterdir():  # files no entry names: a crash mid-write, or junk
            if file.suffix in (".safetensors", ".tmp") and file.stem not in self._entries:
                file.unlink(missing_ok=True)
        self._evict_to(self.max_bytes)  # the budget may have been lowered
        self._dirty = True
        self._save_manifest()

    # --- the index ----------------------------------------------------------------------------

    def _file(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def _add(self, key: str, entry: Entry) -> None:
        self._entries[key] = entry
        self._used += entry.size
        for block in entry.blocks:
            self._index.setdefault(block, set()).add(key)
        self._publish()

    def _drop(self, key: str, reason: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._used -= entry.size
        for block in entry.blocks:
            holders = self._index.get(block)
            if holders is not None:
                holders.discard(key)
                if not holders:
                    del self._index[block]
        self._file(key).unlink(missing_ok=True)
        metrics.DISK_CACHE_EVICTIONS.labels(reason).inc()
        self._dirty = True
        self._publish()

    def _publish(self) -> None:
        metrics.DISK_CACHE_BYTES.set(self._used)

    def _evict_to(self, limit: int) -> None:
        while self._used > limit and self._entries:
            oldest = min(self._entries, key=lambda key: self._entries[key].used)
            self._drop(oldest, "budget")

    def _save_manifest(self) -> None:
        if not self._dirty:
            return
        payload = {"version": 1, "entries": {k: asdict(v) for k, v in self._entries.items()}}
        temporary = self.root / f"{MANIFEST}.{os.getpid()}.part"
        temporary.write_text(json.dumps(payload, separators=(",", ":")))
        os.replace(temporary, self.root / MANIFEST)
        self._dirty = False

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> dict[str, Entry]:
        with self._lock:
            return dict(self._entries)

    # --- per model ----------------------------------------------------------------------------

    def bind(self, model: str, fingerprint: str) -> ModelDisk:
        """This model's view; entries of `model` made from other weights are deleted."""
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.model == model and entry.fingerprint != fingerprint:
                    self._drop(key, "stale")
            if self.enabled:
                self._save_manifest()
        return ModelDisk(self, model, fingerprint)

    def find(self, blocks: list[str]) -> Candidate | None:
        """The entry sharing the most leading blocks with `blocks` (the most recent on a tie)."""
        with self._lock:
            for count in range(len(blocks), 0, -1):
                holders = self._index.get(blocks[count - 1])
                if holders:
                    key = max(holders, key=lambda k: self._entries[k].used)
                    return Candidate(key, count * BLOCK)
        return None

    def covered(self, blocks: list[str]) -> int:
        """Tokens of this prefix the disk holds or is about to (whole blocks)."""
        with self._lock:
            pending = {b for entry in self._pending.values() for b in entry.blocks}
            for count in range(len(blocks), 0, -1):
                if blocks[count - 1] in self._index or blocks[count - 1] in pending:
                    return count * BLOCK
        return 0

    def load(self, key: str) -> tuple[list[int], list[Any]] | None:
        """On the engine thread: the entry's tokens and KV, or None (it is gone or unsound:
        a bad file is deleted with a warning and never served)."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return None
        started = time.perf_counter()
        try:
            loaded = kvfile.read(self._file(key), size=entry.size, digest=entry.digest)
        except Exception as error:  # KVFileError, OSError, or MLX refusing what it read
            log.warning("disk prefix cache entry unsound: ignored and deleted",
                        file=self._file(key).name, error=str(error))
            metrics.DISK_CACHE_LOOKUPS.labels("invalid").inc()
            with self._lock:
                self._drop(key, "invalid")
                self._save_manifest()
            return None
        metrics.DISK_CACHE_SECONDS.labels("load").observe(time.perf_counter() - started)
        with self._lock:
            entry.used = time.time()
            self._dirty = True
        self._jobs.put(None)  # the writer saves the manifest (the new LRU order) soon
        return loaded

    def submit(self, key: str, entry: Entry, blob: kvfile.Blob) -> bool:
        """Queue a write; False when the writer is behind (the write is skipped)."""
        with self._lock:
            if not self.enabled or len(self._pending) >= MAX_PENDING:
                metrics.DISK_CACHE_WRITES.labels("skipped").inc()
                return False
            self._pending[key] = entry
        self._jobs.put((key, entry, blob))
        return True

    # --- the writer thread --------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is not None:
                    self._write(*job)
                with self._lock:
                    self._save_manifest()
            except Exception:
                log.exception("disk prefix cache write failed")
            finally:
                self._jobs.task_done()
            if job is None and self._closing.is_set():
                return

    def _write(self, key: str, entry: Entry, blob: kvfile.Blob) -> None:
        started = time.perf_counter()
        try:
            with self._lock:
                if entry.size > self.max_bytes:
                    metrics.DISK_CACHE_WRITES.labels("skipped").inc()
                    return
                self._evict_to(self.max_bytes - entry.size)
                self._used += entry.size  # reserved before the file exists
            try:
                entry.digest = kvfile.write(blob, self._file(key))
            except OSError as error:
                log.warning("disk prefix cache write failed", error=repr(error))
                metrics.DISK_CACHE_WRITES.labels("failed").inc()
                with self._lock:
                    self._used -= entry.size
                return
            with self._lock:
                self._used -= entry.size
                entry.used = time.time()
                self._add(key, entry)
                # Entries this one extends (same owner, model and weights) are redundant.
                # (Equal chain hash at a block <=> equal seed and tokens up to it; a shorter
                # entry's partial last block, < BLOCK tokens, is given up with it.)
                for other, held in list(self._entries.items()):
                    n = len(held.blocks)
                    if other != key and held.tokens <= entry.tokens and 0 < n <= len(
                            entry.blocks) and held.blocks[-1] == entry.blocks[n - 1]:
                        self._drop(other, "covered")
                self._dirty = True
            metrics.DISK_CACHE_WRITES.labels("written").inc()
            metrics.DISK_CACHE_SECONDS.labels("write").observe(time.perf_counter() - started)
        finally:
            blob.keep.clear()
            with self._lock:
                self._pending.pop(key, None)

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every queued write is on disk; False on timeout."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._jobs.unfinished_tasks == 0:
                return True
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 60.0) -> None:
        """Finish queued writes (a drain's last prefixes are the ones a restart wants)."""
        if not self.enabled:
            return
        if not self.flush(timeout):
            log.warning("disk prefix cache: writes still queued at shutdown were dropped")
        self._closing.set()
        self._jobs.put(None)
        self._writer.join(timeout=10)
        with self._lock:
            self._save_manifest()
            self.enabled = False
        if self._lockfile is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lockfile, fcntl.LOCK_UN)
            self._lockfile.close()
            self._lockfile = None


class ModelDisk:
    """One model's entries (one weights fingerprint). Methods run on the engine thread."""

    def __init__(self, store: DiskCache, model: str, fingerprint: str) -> None:
        self.store = store
        self.model = model
        self.fingerprint = fingerprint

    @property
    def enabled(self) -> bool:
        return self.store.enabled

    def blocks(self, owner: str, tokens: list[int]) -> list[str]:
        seed = f"{self.model}\0{self.fingerprint}\0{owner}"
        return block_hashes(seed, tokens)

    def find(self, owner: str, prompt: list[int]) -> Candidate | None:
        found = self.store.find(self.blocks(owner, prompt)) if self.enabled else None
        if found is None:
            metrics.DISK_CACHE_LOOKUPS.labels("miss").inc()
        return found

    def load(self, candidate: Candidate) -> tuple[list[int], list[Any]] | None:
        loaded = self.store.load(candidate.id)
        if loaded is not None:
            metrics.DISK_CACHE_LOOKUPS.labels("hit").inc()
        return loaded

    def save(self, owner: str, tokens: list[int], layers: list[Any]) -> bool:
        """Queue `tokens`' KV (evaluated, exactly len(tokens) long) for disk when it is worth
        it: long enough, plain KV, and not mostly there already. True when queued."""
        if not self.enabled or len(tokens) < self.store.min_tokens or not kvfile.supported(layers):
            return False
        blocks = self.blocks(owner, tokens)
        if len(tokens) - self.store.covered(blocks) < min(MIN_NEW_TOKENS, self.store.min_tokens):
            return False
        blob = kvfile.encode(tokens, layers)
        entry = Entry(model=self.model, fingerprint=self.fingerprint,
                      owner=hashlib.sha256(owner.encode()).hexdigest(), tokens=len(tokens),
                      size=blob.size, digest="", blocks=blocks, used=time.time())
        return self.store.submit(uuid.uuid4().hex, entry, blob)
