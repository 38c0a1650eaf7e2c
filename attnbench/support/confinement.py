"""Confining a process that runs plugin code, with what Linux offers without privileges.

``confine`` is called in a worker before any plugin code runs (its job, which imports the plugin,
is unpickled only after). Each protection rests on a kernel feature; those the kernel lacks are
reported as not in force, never pretended:

- Landlock (Linux >= 5.13): writes only beneath the given folders (the worker's scratch) and to
  a few device files; reads everywhere except the hidden folders (the ledger's keys); no ptrace
  of, or /proc/<pid>/mem access to, any process outside the worker's own domain (the harness,
  the fork server, other workers); from ABI 4 no TCP bind or connect; from ABI 6 no signals to
  processes outside the domain and no abstract Unix sockets outside it.
- no_new_privs: nothing the worker executes gains privileges (setuid, file capabilities).
- capabilities: run as root, the bounding set and every capability set are emptied, so root in
  a worker is an ordinary user (no CAP_DAC_OVERRIDE, CAP_SYS_PTRACE, CAP_KILL, CAP_SYS_ADMIN).
- seccomp: socket() fails with EACCES, so a worker cannot connect to a named Unix socket (the
  fork server's, a container runtime's), which Landlock of this era does not cover; socketpair()
  and the pipes it already holds still work.

``set_dumpable(False)`` keeps same-user processes out of the calling process's /proc files (fd,
mem, environ) and ptrace: the harness, the fork server and each worker's guard call it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import struct
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# prctl options
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2

# Landlock: the syscalls share one number on every architecture that has them.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8
MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1}  # device ioctls (ABI 5) stay allowed
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE
READ_RIGHTS = EXECUTE | READ_FILE | READ_DIR
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

# Device files a worker may open for writing: the null devices, and a GPU's own device files
# (a CUDA context opens them read-write).
WRITABLE_DEVICE_PATTERNS = ("/dev/null", "/dev/zero", "/dev/full", "/dev/nvidia*", "/dev/dri/*", "/dev/kfd")

# seccomp: (audit architecture, socket's syscall number) per machine.
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
_CAPSET = {"x86_64": 126, "aarch64": 91}


@dataclass(frozen=True)
class Protections:
    """What confined a worker: each field False (or 0) where the kernel or the platform lacked it."""

    landlock_abi: int = 0  # 0: no Landlock
    writes_confined: bool = False  # Landlock: writes only beneath the worker's scratch folders
    reads_hidden: bool = False  # Landlock: the hidden folders (the ledger's keys) unreadable
    ptrace_confined: bool = False  # Landlock: no ptrace or /proc/<pid>/mem of processes outside
    tcp_denied: bool = False  # Landlock ABI 4
    signals_confined: bool = False  # Landlock ABI 6
    no_new_privs: bool = False
    capabilities_dropped: bool | None = None  # None: not root, nothing to drop
    sockets_denied: bool = False  # seccomp

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    def missing(self) -> list[str]:
        """The protections not in force, in words (empty when all are)."""
        words = {"writes_confined": "writes confined to the worker's scratch (Landlock)",
                 "reads_hidden": "the ledger's keys hidden from workers (Landlock)",
                 "ptrace_confined": "ptrace and /proc/<pid>/mem of other processes denied (Landlock)",
                 "tcp_denied": "TCP bind and connect denied (Landlock ABI 4, Linux >= 6.7)",
                 "signals_confined": "signals to processes outside the worker denied (Landlock ABI 6, Linux >= 6.12)",
                 "no_new_privs": "no_new_privs",
                 "sockets_denied": "new sockets denied (seccomp)"}
        missing = [text for name, text in words.items() if not getattr(self, name)]
        if self.capabilities_dropped is False:
            missing.append("root's capabilities dropped")
        return missing


def landlock_abi() -> int:
    """The Landlock ABI version the running kernel offers; 0 where it has none (or is not Linux)."""
    libc = _libc()
    if libc is None:
        return 0
    version = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                           ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(0, version)


def expected_protections(hidden: Sequence[Path] = ()) -> Protections:
    """What ``confine`` would put in force here (for the run's environment), without confining."""
    abi = landlock_abi()
    return Protections(
        landlock_abi=abi, writes_confined=abi >= 1, reads_hidden=abi >= 1 and bool(hidden), ptrace_confined=abi >= 1,
        tcp_denied=abi >= 4, signals_confined=abi >= 6, no_new_privs=_libc() is not None,
        capabilities_dropped=(platform.machine() in _CAPSET) if _is_root() else None,
        sockets_denied=platform.machine() in _SECCOMP_ARCH and _libc() is not None,
    )


def confine(writable: Iterable[Path], hidden: Sequence[Path] = ()) -> Protections:
    """Confine this process for good (see the module's docstring); what was put in force."""
    libc = _libc()
    if libc is None:
        return Protections()
    no_new_privs = libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    capabilities = _drop_capabilities(libc) if _is_root() else None
    sockets = no_new_privs and _deny_sockets(libc)
    abi = landlock_abi()
    landlock = abi >= 1 and no_new_privs and _restrict_paths(libc, abi, list(writable), list(hidden))
    return Protections(
        landlock_abi=abi if landlock else 0, writes_confined=landlock, reads_hidden=landlock and bool(hidden),
        ptrace_confined=landlock, tcp_denied=landlock and abi >= 4, signals_confined=landlock and abi >= 6,
        no_new_privs=no_new_privs, capabilities_dropped=capabilities, sockets_denied=sockets,
    )


def set_dumpable(dumpable: bool) -> bool:
    """False: same-user processes can no longer read this process's /proc/<pid>/{fd,mem,environ}
    or ptrace it (the harness, the fork server and a worker's guard); True: back to the default
    (a worker, whose /proc/<pid>/clear_refs the harness writes to measure its peak memory)."""
    libc = _libc()
    return libc is not None and libc.prctl(PR_SET_DUMPABLE, int(dumpable), 0, 0, 0) == 0


# --- Landlock --------------------------------------------------------------------------------


def _restrict_paths(libc: ctypes.CDLL, abi: int, writable: list[Path], hidden: list[Path]) -> bool:
    fs_rights = FS_RIGHTS_BY_ABI[min(abi, 3)]
    net_rights = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scopes = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attributes = struct.pack("=QQQ", fs_rights, net_rights, scopes)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, attributes, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    try:
        for path, rights in _read_rules(hidden):
            _add_rule(libc, ruleset, path, rights & fs_rights)
        for path in writable:
            _add_rule(libc, ruleset, path, fs_rights)
        for path in _writable_devices():
            _add_rule(libc, ruleset, path, (READ_FILE | WRITE_FILE) & fs_rights)
        return libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) == 0
    finally:
        os.close(ruleset)


def _read_rules(hidden: list[Path]) -> list[tuple[Path, int]]:
    """Read access to everything but the hidden folders: Landlock only grants, so every entry
    beside each hidden folder's ancestors is granted, and the ancestors only their listing."""
    hidden_real = {Path(os.path.realpath(path)) for path in hidden if Path(path).is_dir()}
    if not hidden_real:
        return [(Path("/"), READ_RIGHTS)]
    ancestors = {ancestor for path in hidden_real for ancestor in path.parents}
    rules: list[tuple[Path, int]] = [(Path("/"), READ_DIR)]
    for folder in sorted(ancestors):
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry in ancestors or entry in hidden_real:
                continue
            rules.append((entry, READ_RIGHTS))
    return rules


def _add_rule(libc: ctypes.CDLL, ruleset: int, path: Path, rights: int) -> None:
    try:
        descriptor = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:  # gone meanwhile, or unreadable: nothing to grant
        return
    try:
        if not os.path.isdir(f"/proc/self/fd/{descriptor}"):
            rights &= FILE_RIGHTS
        attribute = struct.pack("=Qi", rights, descriptor)
        libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), attribute,
                     ctypes.c_uint32(0))
    finally:
        os.close(descriptor)


def _writable_devices() -> list[Path]:
    found: list[Path] = []
    for pattern in WRITABLE_DEVICE_PATTERNS:
        folder, _, name = pattern.rpartition("/")
        found.extend(sorted(Path(folder).glob(name)) if "*" in name else [Path(pattern)])
    return [path for path in found if path.exists()]


# --- capabilities and seccomp ----------------------------------------------------------------


def _drop_capabilities(libc: ctypes.CDLL) -> bool:
    """Empty the bounding set, the ambient set and the effective, permitted and inheritable sets."""
    number = _CAPSET.get(platform.machine())
    if number is None:
        return False
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text()) if Path("/proc/sys/kernel/cap_last_cap").exists() \
        else 40
    for capability in range(last + 1):
        libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = bytes(24)  # two (effective, permitted, inheritable) triples, all zero
    return libc.syscall(number, header, data) == 0


def _deny_sockets(libc: ctypes.CDLL) -> bool:
    """A seccomp filter: socket() returns EACCES; every other system call is allowed."""
    arch = _SECCOMP_ARCH.get(platform.machine())
    if arch is None:
        return False
    audit_arch, socket_number = arch
    ld_w_abs, jeq_k, ret_k = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EACCES  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EACCES
    program = [
        (ld_w_abs, 0, 0, 4),  # the architecture
        (jeq_k, 1, 0, audit_arch),
        (ret_k, 0, 0, allow),  # another architecture's calls: not ours to judge
        (ld_w_abs, 0, 0, 0),  # the system call's number
        (jeq_k, 0, 1, socket_number),
        (ret_k, 0, 0, deny),
        (ret_k, 0, 0, allow),
    ]
    filters = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(filters)
    fprog = struct.pack("=HxxxxxxQ", len(program), ctypes.addressof(buffer))
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog, 0, 0) == 0


# --- helpers ---------------------------------------------------------------------------------


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None and platform.system() == "Linux":
        name = ctypes.util.find_library("c")
        if name:
            _LIBC = ctypes.CDLL(name, use_errno=True)
            _LIBC.syscall.restype = ctypes.c_long
    return _LIBC
