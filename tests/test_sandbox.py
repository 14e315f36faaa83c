"""The sandbox escape suite: each attack must be blocked or contained. No skips: a machine that cannot isolate
fails here loudly (the tool refuses to run code there, and this suite says why)."""

import os
import socket
import time

import pytest

from gptlab.common import GptlabError
from gptlab.tools import Toolbox
from gptlab.tools.sandbox import Limits, Sandbox, isolation_error, python_tool

LIMITS = Limits(wall_seconds=10, cpu_seconds=3, memory_bytes=1 << 30, processes=32, workspace_bytes=8 << 20,
                file_bytes=4 << 20, output_bytes=4096)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    path = tmp_path_factory.mktemp("workspace")
    (path / "data.txt").write_text("inside\n")
    return path


@pytest.fixture(scope="module")
def sandbox(workspace):
    assert isolation_error() is None, f"this machine cannot isolate code: {isolation_error()}"
    return Sandbox(workspace, LIMITS)


def run(sandbox, code):
    result = sandbox.run(code)
    return result, result.output


def test_runs_code_in_the_workspace_as_an_unprivileged_user(sandbox, workspace):
    result, out = run(sandbox, "import os; print(open('data.txt').read().strip(), os.getuid(), os.getpid(), "
                               "os.getcwd()); open('new.txt', 'w').write('made inside')")
    assert result.exit_code == 0 and out.split() == ["inside", "1000", "2", "/workspace"], out
    assert (workspace / "new.txt").read_text() == "made inside" and result.written == ["new.txt"]


def test_network_is_unreachable(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    server.settimeout(0.5)
    try:
        result, out = run(sandbox, f"""
import socket
for host in ("127.0.0.1", "1.1.1.1"):
    try:
        socket.create_connection((host, {port}), timeout=2)
        print("CONNECTED", host)
    except OSError as e:
        print("refused", host, e)
print([name for _, name in socket.if_nameindex()])
""")
        with pytest.raises(socket.timeout):
            server.accept()  # nothing reached the listening socket
    finally:
        server.close()
    assert "CONNECTED" not in out and out.count("refused") == 2 and "['lo']" in out, out


def test_files_outside_the_workspace_are_invisible(sandbox, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the host's secret")
    os.chmod(secret, 0o644)  # even a world-readable file
    result, out = run(sandbox, f"""
for path in ({str(secret)!r}, "/etc/shadow", "/root/.bashrc", {str(tmp_path)!r}):
    try:
        print("READ", path, open(path).read()[:20])
    except OSError as e:
        print("blocked", path, type(e).__name__)
""")
    assert "READ" not in out and out.count("blocked") == 4, out


def test_writes_outside_the_workspace_fail(sandbox, tmp_path):
    target = tmp_path / "planted.txt"
    result, out = run(sandbox, f"""
import os
for path in ({str(target)!r}, "/usr/planted", "/etc/planted", "/planted", "../planted"):
    try:
        open(path, "w").write("x")
        print("WROTE", path)
    except OSError as e:
        print("blocked", path, type(e).__name__)
os.symlink({str(target)!r}, "link.txt")  # a link made inside is not copied back, nor followed
""")
    assert "WROTE ../planted" not in out and out.count("WROTE") == 0, out
    assert not target.exists() and not (sandbox.workspace.parent / "planted").exists()
    assert not (sandbox.workspace / "link.txt").exists()


def test_copy_back_never_follows_links_in_the_real_workspace(tmp_path):
    """The real workspace holds a link to a folder outside; the code (which cannot see the link) makes a real
    folder of that name and writes into it: the copy back refuses to walk through the link."""
    workspace, outside = tmp_path / "ws", tmp_path / "outside"
    workspace.mkdir()
    outside.mkdir()
    (workspace / "old.txt").write_text("old")
    os.symlink(outside, workspace / "out")
    result = Sandbox(workspace, LIMITS).run("import os; print(os.listdir('.')); os.makedirs('out'); "
                                            "open('out/x.txt', 'w').write('x'); os.remove('old.txt')")
    assert result.exit_code == 0 and result.output == "['old.txt']\n", result
    assert list(outside.iterdir()) == [] and result.written == [] and result.skipped[0].startswith("out/x.txt: ")
    assert result.deleted == ["old.txt"] and not (workspace / "old.txt").exists()


def test_fork_bomb_is_contained(sandbox):
    start = time.perf_counter()
    result, out = run(sandbox, """
import os
children = 0
try:
    while True:
        if os.fork() == 0:
            import time; time.sleep(60); os._exit(0)
        children += 1
except OSError as e:
    print("fork refused after", children, type(e).__name__)
""")
    assert "fork refused after" in out and int(out.split()[3]) < LIMITS.processes, out
    assert time.perf_counter() - start < LIMITS.wall_seconds  # the sleepers died with the sandbox, at once


def test_memory_bomb_is_contained(workspace):
    sandbox = Sandbox(workspace, Limits(memory_bytes=256 << 20, wall_seconds=60))  # small: touching pages is slow
    result, out = run(sandbox, """
try:
    huge = bytearray(1 << 40)
except MemoryError:
    print("one terabyte refused")
blocks = []
while True:
    blocks.append(bytearray(16 << 20))
""")
    assert result.exit_code == 1 and "one terabyte refused" in out and out.rstrip().endswith("MemoryError"), out


def test_infinite_loop_hits_the_cpu_limit(workspace):
    box = Toolbox([python_tool(workspace, Limits(cpu_seconds=1, wall_seconds=60))])
    result = box.call("python", {"code": "while True:\n    pass"})
    assert not result.ok and "killed by SIGXCPU (CPU-time limit of 1 s)" in result.output, result


def test_sleeping_forever_hits_the_wall_clock_limit(workspace):
    box = Toolbox([python_tool(workspace, Limits(wall_seconds=1.5))])
    start = time.perf_counter()
    result = box.call("python", {"code": "import time; print('started'); time.sleep(600)"})
    assert time.perf_counter() - start < 6
    assert not result.ok and "wall-clock limit of 1.5 s" in result.output and "started" in result.output


def test_filling_the_disk_is_contained(sandbox, workspace):
    result, out = run(sandbox, """
import os
written = 0
try:
    with open("big.bin", "wb") as f:
        while True:
            f.write(b"x" * (1 << 20)); f.flush(); written += 1
except OSError as e:
    print("stopped", written, e.errno)
""")
    # the file-size rlimit (SIGXFSZ) or the tmpfs quota stops it well before the host disk
    assert result.exit_code == -25 or "stopped" in out, (result, out)
    big = workspace / "big.bin"
    assert not big.exists() or big.stat().st_size <= LIMITS.file_bytes
    big.unlink(missing_ok=True)


def test_signalling_the_parent_fails(sandbox):
    result, out = run(sandbox, f"""
import os, signal
print("ppid", os.getppid())
for pid in (os.getppid(), {os.getpid()}, {os.getppid()}):
    try:
        os.kill(pid, signal.SIGKILL)
        print("SENT", pid)
    except OSError as e:
        print("blocked", pid, type(e).__name__)
""")
    # the parent is pid 1 of the sandbox's own pid namespace (its launcher, owned by another uid); the test
    # process and its parent do not exist in that namespace
    assert out.startswith("ppid 1\n") and out.count("blocked") == 3 and "SENT" not in out, out


def test_parent_environment_is_not_inherited(sandbox, monkeypatch):
    monkeypatch.setenv("GPTLAB_TEST_SECRET", "hunter2")
    result, out = run(sandbox, """
import os
print(sorted(os.environ))
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            print(pid, open(f"/proc/{pid}/environ").read())
        except OSError as e:
            print(pid, "blocked", type(e).__name__)
""")
    assert result.exit_code == 0 and "'PATH'" in out and "hunter2" not in out and "GPTLAB_TEST_SECRET" not in out, out


def test_privileged_calls_and_nested_namespaces_are_refused(sandbox):
    result, out = run(sandbox, """
import ctypes, os, subprocess
libc = ctypes.CDLL(None, use_errno=True)
for name, call in [("unshare-user", lambda: libc.unshare(0x10000000)), ("remount-rw", lambda: libc.mount(
        b"none", b"/usr", None, 32 | 4096, None)), ("ptrace-pid1", lambda: libc.ptrace(16, 1, 0, 0)),
        ("chroot", lambda: libc.chroot(b"/tmp"))]:
    print(name, call(), os.strerror(ctypes.get_errno()))
print(subprocess.run(["echo", "children still work"], capture_output=True, text=True).stdout.strip())
""")
    lines = out.splitlines()
    assert result.exit_code == 0 and len(lines) == 5 and lines[-1] == "children still work", out
    assert all(line.split()[1] == "-1" and "not permitted" in line for line in lines[:4]), out


def test_output_is_capped(sandbox):
    result = sandbox.run("print('y' * 100000)")
    assert result.exit_code == 0 and len(result.output) == LIMITS.output_bytes and result.truncated


def test_unsafe_local_is_explicit(workspace):
    box = Toolbox([python_tool(workspace, unsafe_local=True)])
    result = box.call("python", {"code": "import os; print(os.getcwd())"})
    assert result.ok and result.output == str(workspace)
    with pytest.raises(GptlabError, match="does not exist"):
        Sandbox(workspace / "missing")


def test_an_interpreter_that_lives_under_tmp_still_runs(sandbox, tmp_path_factory):
    """A checkout (and its venv) under /tmp: the sandbox's private /tmp must not hide the interpreter (a
    fresh-clone CI run in /tmp failed every sandbox test with 'cannot start python' before the fix)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="gptlab-venv-"))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(root / "venv")],
                       check=True, capture_output=True, timeout=120)
        workspace = tmp_path_factory.mktemp("tmp_venv_workspace")
        code = ("import sys; from pathlib import Path; from gptlab.tools.sandbox import Limits, Sandbox; "
                f"r = Sandbox(Path({str(workspace)!r}), Limits(wall_seconds=10)).run('import sys; print(sys.prefix)'); "
                "print(r.exit_code, r.output.strip())")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run([str(root / "venv" / "bin" / "python"), "-c", code], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["0", str(root / "venv")], done.stdout + done.stderr[-2000:]
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)
