"""The sandbox's launcher: run as a script (`python -I sandbox_init.py`, standard library only), it reads a JSON
config on stdin and runs the code in new Linux namespaces. See gptlab/tools/sandbox.py and docs/sandbox.md.

Processes (A is this script, started by sandbox.py in its own process group):
  A  host side: forks B, writes B's uid/gid maps (it holds CAP_SETUID in the parent namespace, B does not),
     relays B's exit status.
  B  unshare(user, mount, net, pid, ipc, uts); forks C, the first process of the new pid namespace.
  C  pid 1, root of the new user namespace: builds the new root (tmpfs, read-only binds of the system and of
     the interpreter, a fresh /proc, a size-limited tmpfs /workspace and /tmp), copies the workspace in,
     chroots, forks D; when D ends, kills whatever D left (all of the namespace), copies the workspace
     back and reports on the report fd.
  D  drops to the unprivileged sandbox uid (1000 inside; outside, an unused uid, or the caller's own uid
     when the caller is not root), which clears every capability; sets the rlimits, no_new_privs and the
     seccomp filter; execs the interpreter on the code. D's stdout and stderr are the pipe sandbox.py reads.
Every process asks for SIGKILL when its parent dies (PR_SET_PDEATHSIG), so killing A's process group tears
the whole namespace down (pid 1 dying kills every process in it), also processes that left the group.
"""

import ctypes
import json
import os
import platform
import resource
import signal
import stat
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
INSIDE_ID = 1000  # the sandboxed code's uid and gid inside the namespace
ROOT = "/tmp"  # where C mounts the new root's tmpfs (in its own mount namespace: the host /tmp is untouched)
SYSTEM = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")  # shown read-only
DEVICES = ("null", "zero", "full", "random", "urandom")

libc = ctypes.CDLL(None, use_errno=True)

# Seccomp: system calls the code gets EPERM for, by (audit arch, numbers) per machine (from the kernel's
# unistd_64.h and asm-generic/unistd.h). They need privileges the code no longer has, or reach rarely used
# kernel code (keys, bpf, perf, io_uring, userfaultfd): the filter narrows the kernel's attack surface.
# clone3 gets ENOSYS (its flags sit in memory a filter cannot read; libc falls back to clone), and clone
# with a namespace flag gets EPERM, so no nested namespace can be made.
DENIED = ("ptrace process_vm_readv process_vm_writev mount umount2 pivot_root chroot unshare setns keyctl add_key "
          "request_key bpf perf_event_open userfaultfd kexec_load kexec_file_load init_module finit_module "
          "delete_module reboot swapon swapoff acct quotactl open_by_handle_at syslog io_uring_setup "
          "io_uring_enter io_uring_register open_tree move_mount fsopen fsconfig fsmount fspick mount_setattr "
          "clone clone3").split()
_SAME_EVERYWHERE = [425, 426, 427, 428, 429, 430, 431, 432, 433, 442]  # io_uring_*, the new mount API
SYSCALLS = {
    "x86_64": (0xC000003E, [101, 310, 311, 165, 166, 155, 161, 272, 308, 250, 248, 249, 321, 298, 323, 246, 320, 175,
                            313, 176, 169, 167, 168, 163, 179, 304, 103, *_SAME_EVERYWHERE, 56, 435]),
    "aarch64": (0xC00000B7, [117, 270, 271, 40, 39, 41, 51, 97, 268, 219, 217, 218, 280, 241, 282, 104, 294, 105,
                             273, 106, 142, 224, 225, 89, 60, 265, 116, *_SAME_EVERYWHERE, 220, 435]),
}
NAMESPACE_FLAGS = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | 0x02000000


class SetupError(Exception):
    pass


def check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                     data.encode() if data else None), f"mount {source} on {target}")


def die_with_parent() -> None:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def bind_read_only(source: str, target: str) -> None:
    mount(source, target, None, MS_BIND | MS_REC)
    mount("none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def make_dirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def build_root(config: dict) -> None:
    """The new root under ROOT: read-only system and interpreter, fresh /proc and /dev, tmpfs /tmp and /workspace.
    Sources are opened before ROOT's tmpfs hides the host's /tmp and bound through /proc/self/fd, so an
    interpreter or venv that lives under /tmp is still found."""
    links, binds = {}, {}  # target inside ROOT -> link text / O_PATH fd of the source
    for name in SYSTEM:
        source = "/" + name
        if os.path.islink(source):  # merged /usr: /bin -> usr/bin
            links[name] = os.readlink(source)
        elif os.path.isdir(source):
            binds[name] = os.open(source, os.O_PATH)
    for source in config["read_only"]:  # the interpreter's prefix and the venv, wherever they live
        if not any(source == "/" + name or source.startswith(f"/{name}/") for name in SYSTEM):
            binds[source.lstrip("/")] = os.open(source, os.O_PATH)
    devices = {name: os.open(f"/dev/{name}", os.O_PATH) for name in DEVICES}
    mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    mount("sandbox", ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for name, text in links.items():
        os.symlink(text, f"{ROOT}/{name}")
    # the private /tmp and /workspace before the binds: an interpreter or venv that lives under /tmp (a
    # checkout in /tmp) is then bound on top of the new /tmp instead of hidden under it
    for name, size in (("tmp", config["tmp_bytes"]), ("workspace", config["workspace_bytes"])):
        make_dirs(f"{ROOT}/{name}")
        mount("sandbox", f"{ROOT}/{name}", "tmpfs", MS_NOSUID | MS_NODEV,
              f"size={size},nr_inodes={config['max_files']},mode=700,uid={INSIDE_ID},gid={INSIDE_ID}")
    for target, fd in sorted(binds.items()):  # sorted: a folder before anything bound inside it
        make_dirs(f"{ROOT}/{target}")
        bind_read_only(f"/proc/self/fd/{fd}", f"{ROOT}/{target}")
        os.close(fd)
    make_dirs(f"{ROOT}/dev")
    for name, fd in devices.items():
        open(f"{ROOT}/dev/{name}", "w").close()
        mount(f"/proc/self/fd/{fd}", f"{ROOT}/dev/{name}", None, MS_BIND)
        os.close(fd)
    os.symlink("/proc/self/fd", f"{ROOT}/dev/fd")
    make_dirs(f"{ROOT}/proc")
    try:
        mount("proc", f"{ROOT}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:  # a container that masks parts of /proc forbids a new proc mount: run without /proc
        pass
    mount("none", ROOT, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def walk_files(dir_fd: int, prefix: str = ""):
    """(relative path, stat) of every regular file under dir_fd, symlinks neither followed nor listed."""
    for name in sorted(os.listdir(dir_fd)):
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                yield from walk_files(fd, prefix + name + "/")
            finally:
                os.close(fd)
        elif stat.S_ISREG(info.st_mode):
            yield prefix + name, info


def open_parent(root_fd: int, relative: str, create: bool) -> tuple[int, str]:
    """(fd of the folder holding `relative` under root_fd, file name), folders walked without following links."""
    fd = os.dup(root_fd)
    *folders, name = relative.split("/")
    for folder in folders:
        if create:
            try:
                os.mkdir(folder, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
        try:
            next_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        fd = next_fd
    return fd, name


def copy_file(src_fd: int, src: str, dst_fd: int, dst: str, owner: int | None, mtime_ns: int) -> None:
    """Copy src (under src_fd) to dst (under dst_fd) through a temporary name, then rename over dst."""
    src_dir, src_name = open_parent(src_fd, src, create=False)
    dst_dir, dst_name = open_parent(dst_fd, dst, create=True)
    try:
        fin = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=src_dir)
        temporary = f".{dst_name}.sandbox-tmp"
        try:  # a stale one (a run killed while copying); never opened: it could be a link or a hard link
            os.unlink(temporary, dir_fd=dst_dir)
        except FileNotFoundError:
            pass
        fout = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dst_dir)
        try:
            while chunk := os.read(fin, 1 << 20):
                os.write(fout, chunk)
            if owner is not None:
                os.fchown(fout, owner, owner)
            os.utime(fout, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fin)
            os.close(fout)
        os.replace(temporary, dst_name, src_dir_fd=dst_dir, dst_dir_fd=dst_dir)  # replaces a link, never follows it
    finally:
        os.close(src_dir)
        os.close(dst_dir)


def chown_tree(path: str) -> None:
    for folder, _, _ in os.walk(path):
        os.chown(folder, INSIDE_ID, INSIDE_ID)


def copy_in(real_fd: int, config: dict) -> dict[str, tuple[int, int]]:
    files = dict((name, info) for name, info in walk_files(real_fd))
    total = sum(info.st_size for info in files.values())
    if total > config["workspace_bytes"]:
        raise SetupError(f"the workspace holds {total} bytes of files, more than the sandbox's "
                         f"{config['workspace_bytes']}-byte workspace quota")
    inside = os.open(f"{ROOT}/workspace", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, info in files.items():
            copy_file(real_fd, name, inside, name, INSIDE_ID, info.st_mtime_ns)
    finally:
        os.close(inside)
    chown_tree(f"{ROOT}/workspace")
    return {name: (info.st_size, info.st_mtime_ns) for name, info in files.items()}


def copy_out(real_fd: int, before: dict[str, tuple[int, int]]) -> dict:
    """New and changed regular files back to the real workspace; files the code deleted deleted there too."""
    inside = os.open("/workspace", os.O_RDONLY | os.O_DIRECTORY)
    written, skipped = [], []
    try:
        after = {name: info for name, info in walk_files(inside)}
        for name, info in after.items():
            if before.get(name) == (info.st_size, info.st_mtime_ns):
                continue
            try:
                copy_file(inside, name, real_fd, name, None, info.st_mtime_ns)
                written.append(name)
            except OSError as e:  # e.g. a folder of the path is a link in the real workspace
                skipped.append(f"{name}: {e.strerror}")
    finally:
        os.close(inside)
    deleted = []
    for name in sorted(set(before) - set(after)):
        try:
            folder, base = open_parent(real_fd, name, create=False)
            try:
                os.unlink(base, dir_fd=folder)
            finally:
                os.close(folder)
            deleted.append(name)
        except OSError as e:  # already gone, or a folder of the path became a link meanwhile
            skipped.append(f"{name} (delete): {e.strerror}")
    return {"written": written, "deleted": deleted, "skipped": skipped}


def install_seccomp() -> None:
    """Install the filter (comment above SYSCALLS); none on a machine whose numbers are not listed there."""
    machine = platform.machine()
    if machine not in SYSCALLS:
        return
    arch, numbers = SYSCALLS[machine]
    table = dict(zip(DENIED, numbers))
    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JSET/JGE|K, BPF_RET|K
    allow, kill = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38  # SECCOMP_RET_ERRNO | errno
    program = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]  # other ABIs (i386): killed
    if machine == "x86_64":
        program += [(jge, 0, 1, 0x40000000), (ret, 0, 0, kill)]  # the x32 ABI's numbers
    for name in DENIED:
        if name != "clone":
            program += [(jeq, 0, 1, table[name]), (ret, 0, 0, enosys if name == "clone3" else eperm)]
    program += [(jeq, 0, 3, table["clone"]), (ld, 0, 0, 16), (jset, 0, 1, NAMESPACE_FLAGS), (ret, 0, 0, eperm),
                (ret, 0, 0, allow)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(program))(*(Filter(*step) for step in program))
    check(libc.prctl(22, 2, ctypes.byref(Program(len(program), filters)), 0, 0), "seccomp")  # PR_SET_SECCOMP, FILTER


def run_code(config: dict) -> None:
    """D: become the unprivileged sandbox user, set the limits, exec the interpreter. Never returns."""
    if config["clear_groups"]:
        os.setgroups([])
    os.setresgid(INSIDE_ID, INSIDE_ID, INSIDE_ID)
    os.setresuid(INSIDE_ID, INSIDE_ID, INSIDE_ID)  # from uid 0 to non-zero: every capability is dropped
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    limits = config["rlimits"]
    for name, (soft, hard) in limits.items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.chdir("/workspace")
    install_seccomp()
    os.execve(config["python"], [config["python"], "-I", "-u", "-c", config["code"]], config["env"])


def pid1(config: dict, real_fd: int, report_fd: int) -> int:
    """C: build the sandbox, run D, clean up, copy back; returns D's exit status (128 + signal if killed)."""
    die_with_parent()
    build_root(config)
    before = copy_in(real_fd, config)
    os.chroot(ROOT)
    os.chdir("/")
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    child = os.fork()
    if child == 0:
        try:
            os.close(real_fd)
            os.close(report_fd)
            run_code(config)
        except BaseException as e:  # exec failed: say so on the output the caller reads
            os.write(2, f"sandbox: cannot start python: {e}\n".encode())
        os._exit(127)
    status = None
    while status is None:  # as pid 1 we also reap orphans D left behind
        pid, wait_status = os.wait()
        if pid == child:
            status = wait_status
    try:
        os.kill(-1, signal.SIGKILL)  # everything D started, also daemons (pid 1 itself is spared)
    except ProcessLookupError:  # D left nothing behind
        pass
    try:
        while True:
            os.wait()
    except ChildProcessError:
        pass
    report = copy_out(real_fd, before)
    report["exit"] = os.waitstatus_to_exitcode(status)
    os.write(report_fd, json.dumps(report).encode())
    code = report["exit"]
    return code if code >= 0 else 128 - code


def write_maps(pid: int, config: dict) -> None:
    """A: map the sandbox uid/gid of B's user namespace (root: 0->0 for C, 1000->an unused id for D)."""
    if os.geteuid() == 0:
        outside = config["outside_id"]
        uid_map = gid_map = f"0 0 1\n{INSIDE_ID} {outside} 1\n"
    else:  # an unprivileged caller may map only itself, once; setgroups must be denied first
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
        uid_map, gid_map = f"{INSIDE_ID} {os.geteuid()} 1\n", f"{INSIDE_ID} {os.getegid()} 1\n"
    for name, text in (("uid_map", uid_map), ("gid_map", gid_map)):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(text)


def main() -> int:
    config = json.loads(sys.stdin.read())
    stdin = os.open("/dev/null", os.O_RDONLY)
    os.dup2(stdin, 0)
    report_fd = config["report_fd"]
    real_fd = os.open(config["workspace"], os.O_RDONLY | os.O_DIRECTORY)
    config["clear_groups"] = os.geteuid() == 0
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    die_with_parent()
    b = os.fork()
    if b == 0:  # B
        try:
            die_with_parent()
            check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC |
                               CLONE_NEWUTS), "unshare")
            os.write(from_child, b"u")
            if os.read(to_child, 1) != b"m":
                raise SetupError("the launcher could not map the sandbox's user ids")
            c = os.fork()
            if c == 0:
                try:
                    os._exit(pid1(config, real_fd, report_fd))
                except BaseException as e:
                    os.write(report_fd, json.dumps({"error": str(e)}).encode())
                    os._exit(125)
            _, status = os.waitpid(c, 0)
            os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 125)
        except BaseException as e:
            os.write(report_fd, json.dumps({"error": str(e)}).encode())
            os._exit(125)
    if os.read(to_parent, 1) == b"u":
        try:
            write_maps(b, config)
            os.write(from_parent, b"m")
        except OSError as e:
            os.write(report_fd, json.dumps({"error": f"writing the user namespace's id maps: {e}"}).encode())
            os.write(from_parent, b"x")
    _, status = os.waitpid(b, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 125


if __name__ == "__main__":
    sys.exit(main())
