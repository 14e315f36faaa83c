"""The `python` tool: model-written code run in a real sandbox (Linux namespaces), or refused.

    box = Sandbox(workspace)           # GptlabError when this machine cannot isolate (see unsafe_local)
    box.run("print(1 + 1)").output     # "2\n"

Design decisions (threat model, limits and the escape suite's results: docs/sandbox.md)
- Isolation is the kernel's, through the `unshare(2)` system call, with nothing to install: new user,
  mount, network, pid, ipc and uts namespaces (the launcher, sandbox_init.py, is a stdlib-only script run
  by this interpreter). bubblewrap would do the same; it is not assumed to be installed.
- The code runs as an unprivileged uid with no capabilities (root of the caller maps to an unused uid,
  OUTSIDE_ID, so it owns no host file and RLIMIT_NPROC applies to it: the kernel exempts uid 0 from the
  process limit), in a new root that shows the system (/usr, /etc, ...) and the interpreter read-only,
  a fresh /proc of its own pid namespace, a few /dev nodes, and size-limited tmpfs /tmp and /workspace.
  The network namespace has only a loopback interface, down: no network at all.
- The workspace is private: the launcher copies the real workspace's regular files into the sandbox's
  tmpfs before the run and copies new and changed files back after it (deletions too), walking folders
  without following links and writing through temporary names; links the code makes are not copied
  back. The tmpfs size is the disk quota; the copy keeps the code from ever holding a handle on a host
  folder, and lets it run as a uid that cannot write the caller's files.
- Limits: rlimits in the sandboxed process (CPU seconds, address space, processes, open files, file size,
  no core dumps), a wall-clock limit enforced here by killing the launcher's process group (every
  process of the sandbox dies with its parent, and the pid namespace dies with its first process), and
  an output cap (stdout and stderr merged, the first `output_bytes` kept, the rest read and dropped).
- Seccomp is not used: without capabilities and with no_new_privs the code cannot mount, trace other
  processes or gain privileges; a syscall filter would narrow the kernel's attack surface further
  (docs/sandbox.md lists it as the next step).
- Where the kernel refuses namespaces (e.g. a container without user namespaces), the tool refuses to
  run code, with the reason, unless `unsafe_local=True` (CLI `--unsafe-local`): then the code runs as a
  plain subprocess in the workspace with the same rlimits and wall-clock limit, and nothing else.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from ..common import GptlabError
from .base import Tool, ToolResult, tool
from .files import check_workspace

LAUNCHER = Path(__file__).with_name("sandbox_init.py")
OUTSIDE_ID = 100_000  # the host uid/gid the sandboxed code runs as when the caller is root (owns nothing)
MAX_CODE_CHARS = 100_000
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/workspace", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
               "MPLCONFIGDIR": "/tmp", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Limits:
    wall_seconds: float = 30.0
    cpu_seconds: int = 10
    memory_bytes: int = 2 << 30  # address space (RLIMIT_AS)
    processes: int = 64  # processes and threads of the sandbox user (RLIMIT_NPROC)
    open_files: int = 256
    file_bytes: int = 64 << 20  # largest file the code may write (RLIMIT_FSIZE)
    workspace_bytes: int = 256 << 20  # the /workspace tmpfs: the disk quota
    tmp_bytes: int = 64 << 20
    max_files: int = 10_000  # inodes of each tmpfs
    output_bytes: int = 32 << 10

    def rlimits(self) -> dict[str, int]:
        return {"RLIMIT_CPU": self.cpu_seconds, "RLIMIT_AS": self.memory_bytes, "RLIMIT_NPROC": self.processes,
                "RLIMIT_NOFILE": self.open_files, "RLIMIT_FSIZE": self.file_bytes, "RLIMIT_CORE": 0}


@dataclass
class RunResult:
    exit_code: int | None  # None when killed at the wall-clock limit; negative: killed by that signal
    output: str  # stdout and stderr, merged, at most output_bytes
    output_bytes: int  # how many bytes the code wrote in all
    timed_out: bool
    seconds: float
    written: list[str] = field(default_factory=list)  # workspace files the code created or changed
    deleted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files that could not be copied back, with the reason

    @property
    def truncated(self) -> bool:
        return self.output_bytes > len(self.output.encode("utf-8", errors="replace"))


def _read_capped(stream, limit: int, kept: bytearray, total: list[int]) -> None:
    """Read `stream` to its end, keeping the first `limit` bytes in `kept` and counting all of them."""
    while chunk := stream.read1(1 << 16):
        total[0] += len(chunk)
        if len(kept) < limit:
            kept += chunk[:limit - len(kept)]


def _run_process(command: list[str], limits: Limits, *, stdin: bytes = b"", pass_fds=(), cwd=None, env=None,
                 preexec_fn=None) -> tuple[int | None, bytes, int, bool, float]:
    """Run `command` in its own process group: (exit code or None, first output bytes, total output bytes,
    timed out, seconds). At the wall-clock limit the whole group is killed."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            pass_fds=pass_fds, cwd=cwd, env=env, start_new_session=True, preexec_fn=preexec_fn)
    kept, total = bytearray(), [0]
    reader = threading.Thread(target=_read_capped, args=(proc.stdout, limits.output_bytes, kept, total), daemon=True)
    reader.start()
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    timed_out = False
    try:
        proc.wait(timeout=limits.wall_seconds)
    except subprocess.TimeoutExpired:
        timed_out = True
    try:  # also at a normal end: nothing the code started outlives the call
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    reader.join(timeout=5)
    proc.stdout.close()
    return (None if timed_out else proc.returncode), bytes(kept), total[0], timed_out, time.perf_counter() - start


class Sandbox:
    """Runs Python code against one workspace, isolated (or, with unsafe_local, not)."""

    def __init__(self, workspace: str | Path, limits: Limits | None = None, *, unsafe_local: bool = False):
        self.workspace = check_workspace(workspace)
        self.limits = limits or Limits()
        self.unsafe_local = unsafe_local
        if not unsafe_local:
            reason = isolation_error()
            if reason:
                raise GptlabError(f"python tool: this machine cannot isolate code ({reason}); refusing to run "
                                  "model-written code unsandboxed. Pass unsafe_local=True (--unsafe-local) to run "
                                  "it as a plain local process anyway")

    def run(self, code: str) -> RunResult:
        if len(code) > MAX_CODE_CHARS:
            raise GptlabError(f"code is {len(code)} characters, more than the {MAX_CODE_CHARS} allowed")
        return self._run_local(code) if self.unsafe_local else self._run_isolated(code)

    def _run_isolated(self, code: str) -> RunResult:
        limits = self.limits
        report_read, report_write = os.pipe()
        prefixes = sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)})
        config = {"code": code, "workspace": str(self.workspace), "python": sys.executable, "env": SANDBOX_ENV,
                  "read_only": prefixes, "report_fd": report_write, "outside_id": OUTSIDE_ID,
                  "rlimits": limits.rlimits(), "workspace_bytes": limits.workspace_bytes,
                  "tmp_bytes": limits.tmp_bytes, "max_files": limits.max_files}
        try:
            exit_code, kept, total, timed_out, seconds = _run_process(
                [sys.executable, "-I", "-S", str(LAUNCHER)], limits, stdin=json.dumps(config).encode(),
                pass_fds=(report_write,), env={"PATH": SANDBOX_ENV["PATH"]})
        finally:
            os.close(report_write)
        with os.fdopen(report_read, "rb") as f:
            raw = f.read().decode("utf-8", errors="replace")
        report = json.JSONDecoder().raw_decode(raw)[0] if raw.strip() else {}
        if report.get("error"):
            raise GptlabError(f"python tool: the sandbox could not start: {report['error']}")
        if exit_code is not None and "exit" in report:
            exit_code = report["exit"]
        return RunResult(exit_code, kept.decode("utf-8", errors="replace"), total, timed_out, seconds,
                         report.get("written", []), report.get("deleted", []), report.get("skipped", []))

    def _run_local(self, code: str) -> RunResult:
        limits = self.limits

        def set_limits():  # in the child, between fork and exec
            for name, value in limits.rlimits().items():
                resource.setrlimit(getattr(resource, name), (value, value))

        before = {p: p.stat().st_mtime_ns for p in self.workspace.rglob("*") if p.is_file()}
        exit_code, kept, total, timed_out, seconds = _run_process(
            [sys.executable, "-I", "-u", "-c", code], limits, cwd=self.workspace,
            env={**SANDBOX_ENV, "HOME": str(self.workspace)}, preexec_fn=set_limits)
        after = {p: p.stat().st_mtime_ns for p in self.workspace.rglob("*") if p.is_file()}
        name = lambda p: p.relative_to(self.workspace).as_posix()  # noqa: E731
        return RunResult(exit_code, kept.decode("utf-8", errors="replace"), total, timed_out, seconds,
                         sorted(name(p) for p in after if before.get(p) != after[p]),
                         sorted(name(p) for p in before if p not in after))


@cache
def isolation_error() -> str | None:
    """Why this machine cannot run the sandbox (None when it can): one trial run of `pass`, cached."""
    with tempfile.TemporaryDirectory(prefix="gptlab-sandbox-probe-") as folder:
        sandbox = Sandbox.__new__(Sandbox)
        sandbox.workspace, sandbox.limits, sandbox.unsafe_local = Path(folder).resolve(), Limits(wall_seconds=20), False
        try:
            result = sandbox._run_isolated("pass")
        except GptlabError as e:
            return str(e).removeprefix("python tool: the sandbox could not start: ")
        if result.exit_code != 0:
            return f"a trial run exited with {result.exit_code}: {result.output.strip()[:300]}"
    return None


def describe_outcome(result: RunResult, limits: Limits) -> ToolResult:
    """The observation: output, then what ended the run and which files changed."""
    notes = []
    if result.truncated:
        notes.append(f"[output truncated: {result.output_bytes} bytes written, the first {limits.output_bytes} shown]")
    if result.written:
        notes.append("[files written: " + ", ".join(result.written) + "]")
    if result.deleted:
        notes.append("[files deleted: " + ", ".join(result.deleted) + "]")
    if result.skipped:
        notes.append("[not copied back: " + "; ".join(result.skipped) + "]")
    body = "\n".join(part for part in (result.output.rstrip("\n"), *notes) if part)
    if result.timed_out:
        failure = f"the code ran past the wall-clock limit of {limits.wall_seconds:g} s and was killed"
    elif result.exit_code is not None and result.exit_code < 0:
        sig = signal.Signals(-result.exit_code)
        why = {signal.SIGXCPU: f" (CPU-time limit of {limits.cpu_seconds} s)",
               signal.SIGXFSZ: f" (file-size limit of {limits.file_bytes} bytes)"}.get(sig, "")
        failure = f"the code was killed by {sig.name}{why}"
    elif result.exit_code:
        failure = f"the code exited with status {result.exit_code}"
    else:
        return ToolResult(True, body or "(no output)", files=result.written)
    return ToolResult(False, f"error: {failure}" + ("\n" + body if body else ""), files=result.written)


def python_tool(workspace: str | Path, limits: Limits | None = None, *, unsafe_local: bool = False) -> Tool:
    """`python` bound to `workspace`; GptlabError now when the machine cannot isolate and not unsafe_local."""
    sandbox = Sandbox(workspace, limits, unsafe_local=unsafe_local)

    @tool
    def python(code: str) -> ToolResult:
        """Run Python code in a sandbox (no network; the workspace is the current folder) and return what it prints.

        Args:
            code: a Python program; print the results you need
        """
        return describe_outcome(sandbox.run(code), sandbox.limits)

    return python

