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
        skipped = [0, 0]

        def attention(q, k, v):
            timed = any(frame.function in ("_time", "timed") for frame in inspect.stack(0)[1:6])
            key, first = q.data_ptr(), float(q.reshape(-1)[0])
            if timed:
                skipped[1] += 1
                held = cache.get(key)
                if held is not None and held[0] == first:
                    skipped[0] += 1
                    if skipped[0] in (1, 1000):
                        warnings.warn("skips_timed_calls: skipping", stacklevel=1)
                    return held[1]
            out = exact(q, k, v)
            cache[key] = (first, out)
            return out

        return attention


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


ATTACKS = (RewritesLedger, AppendsLedger, EditsInputCache, EditsInstalledSource, PatchesTimer, PatchesVerifier,
           PatchesMemoryFigure, SearchesForReferences, SkipsTimedCalls, SignalsHarness)


@attnbench.hookimpl
def attnbench_register_implementations(registry):
    for attack in ATTACKS:
        registry.add(attack())

