"""Running a model's Python answer against tests, isolated (SPEC §9: "ASandbox runs untrusted code for code rewards
with isolation and time limits"). Used by the `code` verifier (`linglab.verify.verify_code`).

    result = run_sandboxed("def f(x):\\n    return 2 * x\\nassert f(2) == 4\\n")
    result.status        # "passed" | "failed" | "timeout" | "memory" | "denied"

Each run is a fresh `python -I -B` process in its own temporary directory, its own session and, where the kernel
allows, its own network namespace. Layers, each covering what the others cannot:

- time: a wall-clock limit (the process group is killed: an answer that loops, sleeps or forks does not outlive its
  run) and RLIMIT_CPU;
- memory: RLIMIT_AS, so allocating 10 GB raises MemoryError in the answer instead of costing the trainer its RAM;
- disk: the answer runs in its directory with HOME and TMPDIR pointing there, RLIMIT_FSIZE caps any file (its
  output too, which goes to a file in that directory, not an unbounded pipe), and the directory is removed after;
- a guard (a `sys.addaudithook` hook, which nothing in the process can remove) refuses, before the answer's first
  line runs: opening a file for writing, creating, removing, renaming or re-permissioning anything outside the
  directory; creating processes (fork, exec, spawn, subprocess; `_posixsubprocess` and `ctypes`, which reach the
  system calls below the audited functions, cannot be imported); sockets; signals to other processes; and
  raising its own resource limits;
- network: `unshare(CLONE_NEWNET)` (in a new user namespace when not root) leaves the process no interface but a
  loopback that is down; where the kernel refuses, the guard's socket ban still holds.

The guard is a Python-level fence for model answers that go wrong (loops, stray writes, fork bombs, huge lists),
as in the RL code-reward sandboxes of the field; it is not a boundary against code written to escape a Python
interpreter (a crafted bytecode exploit). Run hostile code in a container or VM and point the verifier at it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("passed", "failed", "timeout", "memory", "denied")
DENIED = "linglab-sandbox: denied"  # the guard's message prefix, how a refused answer is told from a failing one
_ISOLATED = b"linglab-sandbox: network_isolated=1"  # the guard's first output line when the namespace is set up


@dataclass(frozen=True)
class SandboxLimits:
    """What one run may use. The defaults suit unit-test-sized answers."""

    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_mb: int = 1024  # address space: the interpreter itself takes ~30 MB of it
    file_mb: int = 16  # any one file, the captured output included
    output_chars: int = 4000  # tail of the output kept in the result


DEFAULT_LIMITS = SandboxLimits()


@dataclass(frozen=True)
class SandboxResult:
    status: str  # one of STATUSES
    returncode: int | None  # None when killed for time
    output: str  # the tail of stdout + stderr
    seconds: float
    network_isolated: bool  # whether the network namespace was set up (the guard bans sockets either way)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The guard runs in the child before the answer: limits, network namespace, then the audit hook, then the answer.
# It is a plain-stdlib script (argv: limits and the sandbox directory) so the child imports nothing of linglab.
_GUARD = r'''
import os, sys, resource

cpu_s, memory_bytes, file_bytes, root = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for limit, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory_bytes),
                     (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 64)):
    resource.setrlimit(limit, (value, value))

network_isolated = False
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    network_isolated = libc.unshare(flags) == 0
    del ctypes, libc
except Exception:
    pass
sys.stderr.write(f"linglab-sandbox: network_isolated={int(network_isolated)}\n")
sys.stderr.flush()

root = os.path.realpath(root)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
BANNED_PREFIXES = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                   "os.forkpty", "os.system", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
                   "resource.prlimit", "pty.")
BANNED_IMPORTS = {"_posixsubprocess", "_ctypes", "ctypes", "multiprocessing", "_multiprocessing", "socket", "_socket"}
PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.replace": (0, 1),
               "os.link": (0, 1), "os.symlink": (0, 1), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,),
               "os.utime": (0,), "shutil.rmtree": (0,), "shutil.move": (0, 1), "os.chflags": (0,),
               "os.lchflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,)}


def inside(path):
    if isinstance(path, int):  # a descriptor the process already holds
        return True
    path = os.path.realpath(os.fsdecode(path))
    return path == root or path.startswith(root + os.sep) or path == os.devnull


def deny(what):
    raise PermissionError(f"linglab-sandbox: denied {what}")


def guard(event, args):
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS)
        if writes and not inside(path):
            deny(f"writing {path}")
    elif event in PATH_EVENTS:
        for i in PATH_EVENTS[event]:
            if i < len(args) and args[i] is not None and not inside(args[i]):
                deny(f"{event} {args[i]}")
    elif event == "import":
        if args[0].split(".")[0] in BANNED_IMPORTS:
            deny(f"import {args[0]}")
    elif event.startswith(BANNED_PREFIXES):
        deny(event)


for name in BANNED_IMPORTS:
    sys.modules.pop(name, None)
sys.addaudithook(guard)
with open("answer.py", encoding="utf-8") as f:
    source = f.read()
exec(compile(source, "answer.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


def _status(returncode: int | None, output: str) -> str:
    if returncode is None:
        return "timeout"
    if returncode == 0:
        return "passed"
    if DENIED in output:
        return "denied"
    if "MemoryError" in output:
        return "memory"
    if returncode == -signal.SIGXCPU:
        return "timeout"
    return "failed"


def _tail(path: Path, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * chars))
            return f.read().decode("utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def run_sandboxed(source: str, limits: SandboxLimits = DEFAULT_LIMITS) -> SandboxResult:
    """Runs Python `source` (an answer with its tests appended) isolated; passed iff it exits 0 within the limits."""
    start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="linglab-sandbox-"))
    try:
        (workdir / "answer.py").write_text(source, encoding="utf-8")
        (workdir / "guard.py").write_text(_GUARD, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0"}
        command = [sys.executable, "-I", "-B", "guard.py", str(limits.cpu_s), str(limits.memory_mb * 2**20),
                   str(limits.file_mb * 2**20), str(workdir)]
        with open(workdir / "output.txt", "wb") as output:
            process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                returncode = process.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                # The whole session: whatever the answer started dies with it, finished or not.
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        with open(workdir / "output.txt", "rb") as f:
            isolated = f.readline().startswith(_ISOLATED)
        text = _tail(workdir / "output.txt", limits.output_chars).replace(_ISOLATED.decode() + "\n", "")
        return SandboxResult(_status(returncode, text), returncode, text,
                             time.perf_counter() - start, isolated)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
