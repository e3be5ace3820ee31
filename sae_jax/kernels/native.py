"""Native CPU kernels, built on first use with this machine's C++ compiler, called through the XLA FFI.

XLA:CPU's TopK runs all rows of a batch on one thread (a partial sort through an index array),
and XLA never runs two of them at once. `csrc/topk_cpu.cc` selects each row in two vectorised
passes and spreads the rows over XLA's intra-op thread pool (its speed against `topk.row_top_k`:
docs/benchmarks.md, "Figures moved out of the code"). It computes what `lax.top_k(pre + bias, k)`
computes: the same values in the same order, ties to the lower index, NaN ordered as XLA orders it.

`csrc/sparse_cpu.cc` holds the sparse decode (`gather_sum`) and the sparse backward's
`gather_dots` and `scatter_rows`: XLA builds their [rows, k, d] gathers and scatter updates in
memory and sorts the slots first; these sum each row or latent in L1 and write it once (a
counting sort by latent for the scatter). Their sums run in a fixed order (documented in the
source), so results do not depend on the thread count, but they differ from XLA's by rounding.

The library is compiled once per machine (`-O3 -march=native`, or `$SAE_JAX_NATIVE_MARCH`) into
`cache_dir()`, named by a hash of the source, the compiler, the flags, jaxlib's version and the CPU, and renamed into place only
when whole, so processes that build at once never load half a file. Where there is no compiler
or the build fails, `available()` is False (with a warning saying why) and callers use the XLA
forms (`kernels.topk`): the same selections, sums equal to float32 rounding, slower.
`SAE_JAX_NATIVE=0` turns the native kernels off. TPU and GPU steps never use them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "topk_cpu.cc", CSRC / "sparse_cpu.cc")
HEADERS = (CSRC / "parallel.h",)
# the FFI handlers the library exports, registered under these target names
TARGETS = {
    "sae_jax_topk_f32": "SaeJaxTopK",
    "sae_jax_gather_sum_f32": "SaeJaxGatherSum",
    "sae_jax_gather_dots_f32": "SaeJaxGatherDots",
    "sae_jax_scatter_rows_f32": "SaeJaxScatterRows",
}
# -ffp-contract=off: no fused multiply-adds, so `scatter_rows` rounds as XLA's scatter does
FLAGS = ("-O3", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w")
BUILD_TIMEOUT_S = 600


class NativeBuildError(RuntimeError):
    """The native library could not be built (no compiler, or the compiler failed)."""


def cache_dir() -> Path:
    """$SAE_JAX_CACHE_DIR, else $XDG_CACHE_HOME/sae_jax, else ~/.cache/sae_jax."""
    if os.environ.get("SAE_JAX_CACHE_DIR"):
        return Path(os.environ["SAE_JAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sae_jax"


def march() -> str:
    """The -march the library is built for: $SAE_JAX_NATIVE_MARCH (e.g. x86-64-v3 for a cluster
    of mixed CPUs sharing one cache folder), else native."""
    return os.environ.get("SAE_JAX_NATIVE_MARCH") or "native"


def compiler() -> str | None:
    """$CXX, else the first of c++, g++, clang++ on PATH."""
    return os.environ.get("CXX") or next((c for c in map(shutil.which, ("c++", "g++", "clang++")) if c), None)


def _cpu_identity() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return platform.machine() + "".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in wanted}))


def library_path() -> Path:
    """The built library, building it first if this machine has none yet (NativeBuildError if it cannot)."""
    cxx = compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler (set CXX, or install g++ or clang++)")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeBuildError(f"C++ compiler {cxx!r} does not run: {e}") from e
    import jaxlib

    digest = hashlib.sha256()
    for part in (
        *(f.read_bytes() for f in SOURCES + HEADERS),
        cxx.encode(),
        version.encode(),
        jaxlib.__version__.encode(),
        " ".join((*FLAGS, march())).encode(),
        _cpu_identity().encode(),
    ):
        digest.update(part)
        digest.update(b"\0")
    name = f"sae_jax_cpu-{digest.hexdigest()[:20]}.so"
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"sae_jax-{os.getuid()}"):
        out = folder / name
        if out.exists():
            return out
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        cmd = [cxx, *FLAGS, f"-march={march()}", "-I", jax.ffi.include_dir(), *map(str, SOURCES), "-o", str(tmp)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            tmp.unlink(missing_ok=True)
            raise NativeBuildError(f"{' '.join(cmd)} ran past {BUILD_TIMEOUT_S} s") from e
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise NativeBuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        os.replace(tmp, out)  # whole or absent: another process never loads a half-written library
        return out
    raise NativeBuildError(f"no writable folder for the native library ({cache_dir()} nor the temp dir)")


@functools.cache
def _load() -> bool:
    try:
        lib = ctypes.CDLL(str(library_path()))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (NativeBuildError, OSError, AttributeError) as e:
        log.warning("sae_jax: the native CPU kernels are unavailable, XLA's top-k and gathers are used instead (slower): %s", e)
        return False
    return True


def available() -> bool:
    """Whether the native kernels can be used here (built and registered; not turned off by SAE_JAX_NATIVE=0)."""
    return os.environ.get("SAE_JAX_NATIVE", "1") != "0" and _load()


def _require(name: str):
    if not available():
        raise RuntimeError(f"sae_jax.kernels.native.{name}: the native library is unavailable (see available())")


def _rows_k(name: str, idx, *others):
    if idx.ndim != 2 or any(o.shape[0] != idx.shape[0] for o in others):
        raise ValueError(f"native.{name}: idx {tuple(idx.shape)} must be [R, K] with R the rows of {[tuple(o.shape) for o in others]}")


def top_k(pre, k: int, bias=None):
    """(values, indices int32) of the k largest `pre + bias` along the last axis, descending: what
    `lax.top_k(pre + bias, k)` returns (ties to the lower index). pre [..., S] float32, bias [S]
    or None. Runs on the CPU only; call `available()` first. Under vmap, a batched bias is
    passed per batch ([..., S]), an unbatched one broadcast."""
    _require("top_k")
    *lead, s = pre.shape
    if not 0 < k <= s:
        raise ValueError(f"native.top_k: k={k} must be in 1..{s} (the last axis of {tuple(pre.shape)})")
    if bias is not None and bias.shape != (s,):
        raise ValueError(f"native.top_k: bias {tuple(bias.shape)} must be [{s}] (the last axis of {tuple(pre.shape)})")
    b = jnp.zeros((s,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    out = (jax.ShapeDtypeStruct((*lead, k), jnp.float32), jax.ShapeDtypeStruct((*lead, k), jnp.int32))
    call = jax.ffi.ffi_call("sae_jax_topk_f32", out, vmap_method="broadcast_all")
    return call(pre.astype(jnp.float32), b, k=np.int64(k), has_bias=bias is not None)


def gather_sum(values, idx, table):
    """out[r] = sum_s values[r, s] * table[idx[r, s]]: [R, D] float32 (values, idx [R, K];
    table [W, D]); each row summed over s in order."""
    _require("gather_sum")
    _rows_k("gather_sum", idx, values)
    out = jax.ShapeDtypeStruct((idx.shape[0], table.shape[-1]), jnp.float32)
    call = jax.ffi.ffi_call("sae_jax_gather_sum_f32", out, vmap_method="broadcast_all")
    return call(values.astype(jnp.float32), idx.astype(jnp.int32), table.astype(jnp.float32))


def gather_dots(table, src, idx):
    """out[r, s] = <table[idx[r, s]], src[r]>: [R, K] float32 (table [W, D], src [R, D])."""
    _require("gather_dots")
    _rows_k("gather_dots", idx, src)
    out = jax.ShapeDtypeStruct(idx.shape, jnp.float32)
    call = jax.ffi.ffi_call("sae_jax_gather_dots_f32", out, vmap_method="broadcast_all")
    return call(table.astype(jnp.float32), src.astype(jnp.float32), idx.astype(jnp.int32))


def scatter_rows(src, coef, idx, width: int, transposed: bool = False):
    """out[j] = sum over slots (r, s) with idx[r, s] = j of coef[r, s] * src[r]: [width, D]
    float32, or its transpose [D, width] written directly; each latent's terms in slot order."""
    _require("scatter_rows")
    _rows_k("scatter_rows", idx, src, coef)
    d = src.shape[-1]
    out = jax.ShapeDtypeStruct((d, width) if transposed else (width, d), jnp.float32)
    call = jax.ffi.ffi_call("sae_jax_scatter_rows_f32", out, vmap_method="broadcast_all")
    return call(src.astype(jnp.float32), coef.astype(jnp.float32), idx.astype(jnp.int32), transposed=transposed)
