"""The seal on a run's ledger (rows.jsonl): only the harness can write a row that verifies, so a row
changed, added or removed afterwards (by hand, by a script) is named instead of reported.

Each line the harness writes carries one more top-level field, ``"seal": {"index", "chain", "mac"}``:

    d_i      sha256 of the line's canonical JSON without its seal (``content_digest``)
    chain_i  sha256(chain_{i-1} ‖ d_i ‖ i), chain_{-1} = sha256(ledger id)        needs no key
    mac_i    HMAC-SHA256(key, ledger id ‖ i ‖ d_i)                                needs the run's key

The key, 32 random bytes per run, never enters the run folder: it is kept in the user's key store
(``ledger_key_store()``, private to the user) under the run's random ledger id, with the head (how
many rows the harness has written, and the last chain) and a note of the folder it sealed.
``ledger.json`` in the run folder names the ledger id and keeps the head too, for the keyless check
of a run copied to another machine.

With the key, each row's MAC proves its content and place; the head proves no row was cut from the
end; and the folder's note catches a ledger.json removed or replaced. Without it only the chain can
be checked: it catches edits that left the seals as they were, not an editor who recomputes it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from attnbench.contract.errors import UserError

LEDGER_FILE = "ledger.json"
SEAL_FIELD = "seal"
ALGORITHM = "sha256 chain, HMAC-SHA256 per row (attnbench ledger 1)"
KEY_STORE_VARIABLE = "ATTNBENCH_LEDGER_KEYS"
_LEDGER_ID = re.compile(r"[0-9a-f]{32}")
_HEX_64 = re.compile(r"[0-9a-f]{64}")

CHANGED, ADDED, REMOVED = "changed", "added", "removed"
SEALED, UNSEALED, UNVERIFIABLE = "sealed", "unsealed", "unverifiable"


def ledger_key_store() -> Path:
    """Where this user's ledger keys are kept: $ATTNBENCH_LEDGER_KEYS, else
    $XDG_STATE_HOME/attnbench/ledger-keys, else ~/.local/state/attnbench/ledger-keys. Workers must
    not read it."""
    configured = os.environ.get(KEY_STORE_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if state and Path(state).is_absolute() else Path.home() / ".local" / "state"
    return base / "attnbench" / "ledger-keys"


def content_digest(fields: Mapping[str, Any]) -> str:
    """d_i: the sha256 of a line's fields, without its seal, as canonical JSON."""
    content = {name: value for name, value in fields.items() if name != SEAL_FIELD}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _genesis(ledger_id: str) -> str:
    return hashlib.sha256(ledger_id.encode("ascii")).hexdigest()


def _link(previous: str, digest: str, index: int) -> str:
    return hashlib.sha256(bytes.fromhex(previous) + bytes.fromhex(digest) + index.to_bytes(8, "big")).hexdigest()


def _mac(key: bytes, ledger_id: str, index: int, digest: str) -> str:
    return hmac.new(key, f"{ledger_id}:{index}:{digest}".encode("ascii"), hashlib.sha256).hexdigest()


# --- the harness's side: starting a ledger and sealing its rows ------------------------------------


class Head(NamedTuple):
    rows: int  # rows the harness has written
    chain: str  # the last one's chain (chain_{-1} before the first)


class Sealer:
    """Seals each line the harness appends to a run's rows, and records the head once it is on disk."""

    def __init__(self, run_dir: Path, store: Path, ledger_id: str, key: bytes, head: Head) -> None:
        self._run_dir, self._store, self._ledger_id, self._key = run_dir, store, ledger_id, key
        self._head = head
        self._pending = head.chain

    def sealed_line(self, data: Mapping[str, Any]) -> str:
        """``data`` as one JSON line with its seal (without the newline)."""
        digest = content_digest(json.loads(json.dumps(data)))  # as a reader will parse it back
        index = self._head.rows
        self._pending = _link(self._head.chain, digest, index)
        seal = {"index": index, "chain": self._pending, "mac": _mac(self._key, self._ledger_id, index, digest)}
        return json.dumps({**data, SEAL_FIELD: seal})

    def written(self) -> None:
        """The line just sealed is on disk: the head counts it."""
        self._head = Head(self._head.rows + 1, self._pending)
        _record_head(self._run_dir, self._store, self._ledger_id, self._head)


def start_ledger(run_dir: Path) -> None:
    """A new ledger for a new run: its key and head in the key store, its ledger.json in the folder."""
    store = ledger_key_store()
    ledger_id = secrets.token_hex(16)
    try:
        store.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            store.chmod(0o700)
        except OSError:  # a folder this user does not own: the files in it are private all the same
            pass
        _write_file(store / f"{ledger_id}.key", json.dumps({"key": secrets.token_bytes(32).hex()}), 0o600)
        _write_file(store / _folder_note(run_dir), json.dumps({"ledger": ledger_id}), 0o600)
    except OSError as error:
        raise UserError(f"{store}: cannot keep the run's ledger key there ({error.strerror or error}); set "
                        f"{KEY_STORE_VARIABLE} to a private folder this user can write") from None
    _record_head(run_dir, store, ledger_id, Head(0, _genesis(ledger_id)))


def open_sealer(run_dir: Path) -> Sealer | None:
    """The sealer that goes on with the run's ledger from its head; None for a run folder from
    before ledgers were sealed (its rows stay as they were)."""
    info, problem = _ledger_info(run_dir)
    if problem:
        raise UserError(f"{run_dir}: {problem}")
    if info is None:
        return None
    store = ledger_key_store()
    key = _read_key(store, info["ledger"])
    if key is None:
        raise UserError(f"{run_dir}: its ledger key is not in {store} (sealed on another machine, or by another "
                        "user); only the machine that started a run can add rows to it: start a new run")
    head = _read_head(store, info["ledger"]) or Head(info["rows"], info["chain"])
    return Sealer(run_dir, store, info["ledger"], key, head)


def record_head(run_dir: Path, check: LedgerCheck) -> None:
    """After a check that found the ledger intact (resuming): its head is the rows found."""
    info, _ = _ledger_info(run_dir)
    if info is not None and check.head is not None:
        _record_head(run_dir, ledger_key_store(), info["ledger"], check.head)


def _record_head(run_dir: Path, store: Path, ledger_id: str, head: Head) -> None:
    _write_file(store / f"{ledger_id}.head", json.dumps(head._asdict()), 0o600)
    info = {"ledger": ledger_id, "algorithm": ALGORITHM, "key_store": str(store), **head._asdict()}
    _write_file(run_dir / LEDGER_FILE, json.dumps(info, indent=2) + "\n", 0o644)


def _write_file(path: Path, text: str, mode: int) -> None:
    """Atomically: a temporary file beside it, on disk, then renamed over it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# --- reading what was recorded ---------------------------------------------------------------------


def _folder_note(run_dir: Path) -> str:
    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:32] + ".folder"


def _read_store_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_key(store: Path, ledger_id: str) -> bytes | None:
    data = _read_store_json(store / f"{ledger_id}.key")
    try:
        key = bytes.fromhex(data["key"]) if data else None
    except (TypeError, ValueError, KeyError):
        return None
    return key if key else None


def _read_head(store: Path, ledger_id: str) -> Head | None:
    return _head_of(_read_store_json(store / f"{ledger_id}.head"))


def _head_of(data: Mapping[str, Any] | None) -> Head | None:
    if not data:
        return None
    rows, chain = data.get("rows"), data.get("chain")
    if isinstance(rows, int) and not isinstance(rows, bool) and rows >= 0 and isinstance(chain, str) \
            and _HEX_64.fullmatch(chain):
        return Head(rows, chain)
    return None


def _witness(store: Path, run_dir: Path) -> str | None:
    """The ledger this machine sealed in this folder, if any."""
    data = _read_store_json(store / _folder_note(run_dir))
    ledger_id = data.get("ledger") if data else None
    return ledger_id if isinstance(ledger_id, str) and _LEDGER_ID.fullmatch(ledger_id) else None


def _ledger_info(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """ledger.json's fields (None when there is none), or what is wrong with it."""
    path = run_dir / LEDGER_FILE
    if not path.exists():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return None, f"{LEDGER_FILE} cannot be read ({type(error).__name__}: {error})"
    head = _head_of(data) if isinstance(data, dict) else None
    if head is None or not (isinstance(data.get("ledger"), str) and _LEDGER_ID.fullmatch(data["ledger"])):
        return None, f"{LEDGER_FILE} is not one attnbench wrote"
    return {**data, **head._asdict()}, None


# --- the check ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One row's line as read: its number, its seal as stored (None: none), its content digest."""

    line: int
    seal: Any
    digest: str | None


@dataclass(frozen=True)
class Finding:
    kind: str  # CHANGED, ADDED or REMOVED
    line: int  # its line in rows.jsonl; for removed rows, the line they came after (0: the start)
    point: str  # the point the line names; for removed rows, which rows of the ledger
    why: str = ""
    at_end: bool = False  # removed rows: cut from the end

    def text(self, rows_path: Path | str) -> str:
        if self.kind == REMOVED:
            place = "at its start" if self.line == 0 else f"after line {self.line}"
            return f"{rows_path}: {self.point} ({place}{', the last' if self.at_end else ''}) removed after the run"
        return f"{rows_path} line {self.line} ({self.point}): {self.kind} after the run ({self.why}); not reported"

    @property
    def short(self) -> str:
        if self.kind == REMOVED:
            return f"{self.point} removed" + (" from the end" if self.at_end else f" after line {self.line}")
        return f"line {self.line} ({self.point}) {self.kind}"


@dataclass(frozen=True)
class LedgerCheck:
    state: str = UNSEALED  # SEALED, UNSEALED (from before seals) or UNVERIFIABLE
    key_present: bool = False
    verified: int = 0  # rows whose seal verified
    findings: tuple[Finding, ...] = ()
    problems: tuple[str, ...] = ()  # about the ledger as a whole: ledger.json removed or replaced
    head: Head | None = None  # the rows found in sequence: where a resumed run goes on

    @property
    def excluded_lines(self) -> frozenset[int]:
        """The lines that are no result: changed or added after the run."""
        return frozenset(finding.line for finding in self.findings if finding.kind != REMOVED)

    @property
    def edited(self) -> bool:
        return bool(self.findings or self.problems)

    def summary(self) -> str:
        """The ledger's state in one line, for the report."""
        if self.state == UNSEALED:
            return ("not sealed (written before attnbench sealed its ledgers, or its seals were removed): its rows "
                    "cannot be verified")
        if self.state == UNVERIFIABLE:
            return "; ".join(self.problems)
        basis = ("key present" if self.key_present else
                 "key not on this machine: edits that recompute the chain cannot be detected here")
        if not self.edited:
            verb = "verified" if self.key_present else "chain verified"
            return f"sealed, {verb} ({self.verified} rows, {basis})"
        counts = ", ".join(f"{sum(f.kind == kind for f in self.findings)} {kind}"
                           for kind in (CHANGED, ADDED, REMOVED) if any(f.kind == kind for f in self.findings))
        listed = "; ".join([*self.problems, *(finding.short for finding in self.findings)])
        return (f"EDITED after the run{f' ({counts})' if counts else ''}: {listed}. Changed and added rows are not "
                f"reported; {self.verified} rows verified ({basis})")

    def warnings(self, rows_path: Path | str) -> list[str]:
        """One line per edited row, per problem of the ledger, and what could not be checked here."""
        lines = [f"{rows_path}: {problem}" for problem in self.problems]
        lines += [finding.text(rows_path) for finding in self.findings]
        if self.state == SEALED and not self.key_present:
            lines.append(f"{rows_path}: sealed on another machine: its key is not here; edits that recompute the "
                         "chain cannot be detected here")
        return lines


def check_ledger(run_dir: Path, entries: Sequence[Entry], name: Callable[[int], str]) -> LedgerCheck:
    """The run's rows against what the harness recorded. ``name(i)``: the point of ``entries[i]``."""
    store = ledger_key_store()
    info, problem = _ledger_info(run_dir)
    problems = [problem] if problem else []
    witness, recorded = _witness(store, run_dir), info["ledger"] if info else None
    ledger_id = witness or recorded
    if witness and recorded != witness:
        problems.append(f"{LEDGER_FILE} was {'replaced' if info or problem else 'removed'} after the run (this "
                        f"machine sealed ledger {witness} in this folder)")
    if ledger_id is None:
        if problems or any(entry.seal is not None for entry in entries):
            problems.append("its rows cannot be verified" if problems else
                            f"its rows are sealed but its {LEDGER_FILE} is missing: they cannot be verified")
            return LedgerCheck(UNVERIFIABLE, problems=tuple(problems))
        return LedgerCheck(UNSEALED)
    key = _read_key(store, ledger_id)
    head = _read_head(store, ledger_id) if key else None
    if head is None and info is not None and recorded == ledger_id:
        head = Head(info["rows"], info["chain"])
    findings, verified, last = _walk(entries, name, ledger_id, key, head)
    return LedgerCheck(SEALED, key is not None, verified, tuple(findings), tuple(problems), last)


def _walk(entries: Sequence[Entry], name: Callable[[int], str], ledger_id: str, key: bytes | None,
          head: Head | None) -> tuple[list[Finding], int, Head]:
    """With the key, each row's MAC (its content and index) decides, and the chain is recomputed;
    without it, each row's chain must follow from the row before it."""
    findings: list[Finding] = []
    expected, previous, after, verified = 0, _genesis(ledger_id), 0, 0
    written = head.rows if head is not None else None  # rows the harness recorded writing
    for position, entry in enumerate(entries):
        seal = _parsed_seal(entry.seal)
        if seal is None:
            why = "it has no seal" if entry.seal is None else "its seal is not one attnbench wrote"
            findings.append(Finding(ADDED, entry.line, name(position), why))
            continue
        index, chain, mac = seal
        if index < expected:
            why = f"its seal repeats the place of the harness's row {index + 1}"
            findings.append(Finding(ADDED, entry.line, name(position), why))
            continue
        linked = previous if index == expected else None  # after a gap, the link cannot be checked
        if key is not None:
            intact = hmac.compare_digest(mac, _mac(key, ledger_id, index, entry.digest))
            following = _link(linked, entry.digest, index) if linked is not None else chain
        else:
            intact = linked is None or hmac.compare_digest(chain, _link(linked, entry.digest, index))
            following = chain
        if not intact and (index > expected or (written is not None and index >= written)):
            # a row the harness never wrote, claiming a place: the rows after it keep theirs
            findings.append(Finding(ADDED, entry.line, name(position), "a row the harness never wrote"))
            continue
        missing_end = index if written is None else min(index, written)
        if missing_end > expected:
            findings.append(_removed(expected, missing_end, after))
        if intact:
            verified += linked is not None or key is not None
        else:
            findings.append(Finding(CHANGED, entry.line, name(position), "its content differs from what was sealed"))
        expected, previous, after = index + 1, following, entry.line
    if written is not None and expected < written:
        findings.append(_removed(expected, written, after, at_end=True))
    return findings, verified, Head(expected, previous)


def _removed(first: int, end: int, after: int, at_end: bool = False) -> Finding:
    rows = f"row {first + 1}" if end - first == 1 else f"rows {first + 1} to {end}"  # counted from 1, as lines are
    return Finding(REMOVED, after, f"the harness's {rows}", at_end=at_end)


def _parsed_seal(seal: Any) -> tuple[int, str, str] | None:
    if not isinstance(seal, dict):
        return None
    index, chain, mac = seal.get("index"), seal.get("chain"), seal.get("mac")
    if not (isinstance(index, int) and not isinstance(index, bool) and index >= 0):
        return None
    if not (isinstance(chain, str) and _HEX_64.fullmatch(chain) and isinstance(mac, str) and _HEX_64.fullmatch(mac)):
        return None
    return index, chain, mac
