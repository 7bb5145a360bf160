"""The CPU kernels of the view augmentation (`view_kernels.c`), built on first use and loaded through ctypes.

`ViewAugmentation` colours views on a CPU with one fused pass per view (`view_kernels.c`) instead of some forty torch
operations. The C file is plain C99 with no torch headers, so building it takes well under a second; it is built once
per machine and source, with the C compiler the environment names (``$CC``, else Python's, else ``cc``), into a cache
folder (``$STELLAR_HF_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/stellar_hf/kernels``, else ``~/.cache/...``).

Where no compiler is found or the build fails, `view_kernels` says why once (a warning naming the compiler and its
message) and returns None, and the views are coloured by the eager torch path: the same values to float rounding,
more slowly. ``STELLAR_HF_NATIVE=0`` turns the kernels off.

The build writes a temporary file beside the cached library and renames it into place, so a build killed at any
point leaves either no library or a whole one; a library that does not load (a file damaged after the fact) is
rebuilt once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("view_kernels.c")
# -ffp-contract=off: no fused multiply-adds the source does not write, so each rounding stays torchvision's;
# -fno-trapping-math lets the compiler compute both sides of a select, which is what vectorises the hue rotation
# (it changes no value, only whether floating-point exceptions may be raised).
FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off", "-fno-trapping-math")
# The vector instructions to build for, by the capability torch detected on this CPU (the library is cached per
# capability, so a cache folder shared by machines of different CPUs never hands one an instruction it lacks): the
# x86-64 levels where the compiler knows them (GCC 11+, clang 12+), else the same extensions one by one, else none.
_AVX2 = ("-mavx2", "-mfma", "-mbmi2", "-mf16c")
_ARCHITECTURE_FLAGS = {
    "AVX512": (("-march=x86-64-v4",), (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"), ()),
    "AVX2": (("-march=x86-64-v3",), _AVX2, ()),
}
BUILD_TIMEOUT_S = 120

_ARGUMENT_TYPES = (
    ctypes.c_void_p,  # views
    ctypes.c_void_p,  # out
    ctypes.c_int64,  # count
    ctypes.c_int64,  # height
    ctypes.c_int64,  # width
    ctypes.c_void_p,  # operations
    ctypes.c_void_p,  # factors
    ctypes.c_void_p,  # gray
    ctypes.c_void_p,  # blur_radius
    ctypes.c_void_p,  # taps
    ctypes.c_int64,  # taps_stride
    ctypes.c_void_p,  # scratch
)

_lock = threading.Lock()
_loaded: dict = {}  # cache folder -> (library or None, reason)


class NativeKernelsUnavailable(RuntimeError):
    """The CPU view kernels could not be built or loaded here; the message says why."""


def cache_dir() -> Path:
    """Where built kernels are kept: ``$STELLAR_HF_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/stellar_hf/kernels``
    (``~/.cache`` when unset; the temporary folder when there is no home either)."""
    if os.environ.get("STELLAR_HF_KERNEL_CACHE"):
        return Path(os.environ["STELLAR_HF_KERNEL_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "stellar_hf" / "kernels"
    try:
        return Path.home() / ".cache" / "stellar_hf" / "kernels"
    except RuntimeError:  # no $HOME and no password entry (some containers)
        return Path(tempfile.gettempdir()) / "stellar_hf-kernels"


def compiler() -> list[str]:
    """The C compiler command: ``$CC`` (split as a shell would), else the one Python was built with if it is on the
    PATH, else ``cc``."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    configured = shlex.split(sysconfig.get_config_var("CC") or "")
    if configured and shutil.which(configured[0]):
        return configured
    return ["cc"]


def _capability() -> str:
    """The vector extensions to build for: torch's detected CPU capability on x86-64 ("AVX512", "AVX2",
    "DEFAULT"), the machine's name elsewhere (its compilers' defaults)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return platform.machine()
    return torch.backends.cpu.get_cpu_capability()


def _flag_choices(capability: str) -> tuple[tuple[str, ...], ...]:
    """The full flags to try in turn, best first, for `capability`."""
    return tuple((*FLAGS, *architecture) for architecture in _ARCHITECTURE_FLAGS.get(capability, ((),)))


def library_path(folder: Optional[Path] = None) -> Path:
    """Where the library for this machine, compiler and source is (or would be) cached in `folder` (default
    `cache_dir()`)."""
    return _library_path(cache_dir() if folder is None else folder, compiler(), _capability())


def _library_path(folder: Path, command: list[str], capability: str) -> Path:
    """The cached library's path, named by a hash of everything that decides its contents."""
    try:
        version = _run_compiler([*command, "--version"], timeout=30)[1]
    except NativeKernelsUnavailable:
        version = ""
    key = hashlib.sha256()
    flags = _flag_choices(capability)
    for part in (SOURCE.read_bytes(), " ".join(command).encode(), version.encode(), repr(flags).encode(),
                 capability.encode(), platform.machine().encode(), platform.system().encode()):  # fmt: skip
        key.update(part)
        key.update(b"\0")
    suffix = ".dll" if platform.system() == "Windows" else ".so"
    return folder / f"view_kernels-{key.hexdigest()[:16]}{suffix}"


def _build(path: Path, command: list[str], flag_choices: tuple[tuple[str, ...], ...]) -> None:
    """Compile the source into `path` with the first of `flag_choices` the compiler takes: into a temporary file in
    the same folder, made readable by all (a cache shared by several users) and renamed over `path` when whole."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path.parent)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise NativeKernelsUnavailable(
            f"cannot write the kernel cache {path.parent} ({error}); set STELLAR_HF_KERNEL_CACHE to a writable folder"
        ) from error
    os.close(handle)
    try:
        failures = []
        for flags in flag_choices:
            returncode, output = _run_compiler([*command, *flags, str(SOURCE), "-o", temporary], BUILD_TIMEOUT_S)
            if returncode == 0:
                break
            failures.append(output.strip()[-2000:])
        else:
            raise NativeKernelsUnavailable(f"the C compiler {command!r} failed on {SOURCE.name}: {failures[0]}")
        os.chmod(temporary, 0o755)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _run_compiler(arguments: list[str], timeout: float) -> tuple[int, str]:
    """Run the compiler: (exit status, output). On timeout it is killed with the passes it started (cc1, as, ld:
    its process group), which would otherwise hold its output open."""
    try:
        process = subprocess.Popen(arguments, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=hasattr(os, "killpg"))  # fmt: skip
    except OSError as error:
        raise NativeKernelsUnavailable(f"could not run the C compiler {arguments[0]!r}: {error}") from error
    try:
        output, _ = process.communicate(timeout=timeout)
    except BaseException as error:  # the timeout, or an interrupt: the passes must not outlive the build
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
        process.communicate()
        if isinstance(error, subprocess.TimeoutExpired):
            raise NativeKernelsUnavailable(f"the C compiler {arguments[0]!r} took over {timeout} s") from None
        raise
    return process.returncode, output


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove what builds killed midway left (older than any build still running could be)."""
    for leftover in folder.glob(".view_kernels-*.tmp"):
        try:
            if time.time() - leftover.stat().st_mtime > 2 * BUILD_TIMEOUT_S:
                leftover.unlink()
        except OSError:  # removed by another process meanwhile
            pass


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    function = library.stellar_color_views
    function.argtypes = _ARGUMENT_TYPES
    function.restype = None
    return library


def view_kernels() -> Optional[ctypes.CDLL]:
    """The loaded kernels (built first if this machine has none cached), or None where they cannot be had here; the
    first failure is logged as a warning with its reason (`why_unavailable` returns it)."""
    try:
        return require_view_kernels()
    except NativeKernelsUnavailable:
        return None


def why_unavailable() -> Optional[str]:
    """Why `view_kernels` returned None (None when it did not, or was not yet called)."""
    entry = _loaded.get(cache_dir())
    return entry[1] if entry else None


def require_view_kernels() -> ctypes.CDLL:
    """`view_kernels`, raising `NativeKernelsUnavailable` with the reason instead of returning None."""
    folder = cache_dir()
    with _lock:
        if folder not in _loaded:
            _loaded[folder] = _build_and_load(folder)
            if _loaded[folder][0] is None:
                logger.warning(
                    "the CPU view kernels are unavailable (%s); views are coloured by the eager torch path: the same "
                    "values, more slowly",
                    _loaded[folder][1],
                )
        library, reason = _loaded[folder]
    if library is None:
        raise NativeKernelsUnavailable(reason)
    return library


def _build_and_load(folder: Path) -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    if os.environ.get("STELLAR_HF_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "turned off by STELLAR_HF_NATIVE"
    try:
        command, capability = compiler(), _capability()
        path = _library_path(folder, command, capability)
        if path.exists():
            try:
                return _load(path), None
            except OSError as error:
                logger.warning("the cached view kernels %s do not load (%s); rebuilding them", path, error)
        _build(path, command, _flag_choices(capability))
        return _load(path), None
    except (NativeKernelsUnavailable, OSError, ValueError) as error:  # ValueError: $CC that shlex cannot split
        return None, str(error)
