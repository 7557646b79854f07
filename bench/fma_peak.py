"""The machine's measured fp32 FMA peak (GFLOP/s) per thread count, for "% of peak" columns.

A tiny C++ program compiled at run time (``g++ -O3``): each thread runs a tight loop of 12 independent
vector FMA chains (AVX-512 ``__m512`` where the CPU has it, else AVX2 ``__m256``), enough accumulators to
cover FMA latency × throughput on current x86 cores; threads are ``std::thread``s started together, the
result is total FLOPs ÷ the slowest thread's time (best of a few trials). If compiling or running fails,
the fallback is a large single-thread float32 matmul's GFLOP/s (scaled by threads, and labelled so).

    python -m bench.fma_peak [--threads 1 2]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

_SRC = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#if defined(USE_AVX512)
typedef __m512 vec;
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define ADD _mm512_add_ps
#define REDUCE(v) _mm512_reduce_add_ps(v)
static const int LANES = 16;
#else
typedef __m256 vec;
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define ADD _mm256_add_ps
static float REDUCE(__m256 v) { float t[8]; _mm256_storeu_ps(t, v); float s = 0; for (int i = 0; i < 8; ++i) s += t[i]; return s; }
static const int LANES = 8;
#endif

static volatile float sink;

static double run(long iters, float seed) {
    vec a0 = SET1(seed), a1 = SET1(seed + 1), a2 = SET1(seed + 2), a3 = SET1(seed + 3), a4 = SET1(seed + 4),
        a5 = SET1(seed + 5), a6 = SET1(seed + 6), a7 = SET1(seed + 7), a8 = SET1(seed + 8), a9 = SET1(seed + 9),
        a10 = SET1(seed + 10), a11 = SET1(seed + 11);
    const vec m = SET1(0.999999f), c = SET1(1e-7f);
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < iters; ++i) {
        a0 = FMA(a0, m, c); a1 = FMA(a1, m, c); a2 = FMA(a2, m, c); a3 = FMA(a3, m, c);
        a4 = FMA(a4, m, c); a5 = FMA(a5, m, c); a6 = FMA(a6, m, c); a7 = FMA(a7, m, c);
        a8 = FMA(a8, m, c); a9 = FMA(a9, m, c); a10 = FMA(a10, m, c); a11 = FMA(a11, m, c);
    }
    auto t1 = std::chrono::steady_clock::now();
    vec s = ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7)));
    s = ADD(s, ADD(ADD(a8, a9), ADD(a10, a11)));
    sink = REDUCE(s);
    return std::chrono::duration<double>(t1 - t0).count();
}

int main(int argc, char** argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    long iters = argc > 2 ? atol(argv[2]) : 100000000L;
    int trials = argc > 3 ? atoi(argv[3]) : 3;
    double best = 0;
    for (int t = 0; t < trials; ++t) {
        std::vector<double> secs(threads);
        std::vector<std::thread> pool;
        auto t0 = std::chrono::steady_clock::now();
        for (int k = 0; k < threads; ++k) pool.emplace_back([&, k] { secs[k] = run(iters, 1.0f + k); });
        for (auto& th : pool) th.join();
        double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        double slowest = 0;
        for (double s : secs) slowest = s > slowest ? s : slowest;
        (void)wall;
        double gflops = 2.0 * 12 * LANES * (double)iters * threads / slowest / 1e9;
        if (gflops > best) best = gflops;
    }
    printf("%.3f\n", best);
    return 0;
}
"""


def _cpu_has(flag: str) -> bool:
    try:
        return f" {flag}" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _compile(isa: str, log=print) -> Optional[Path]:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        log("fma_peak: no C++ compiler found")
        return None
    flags = ["-mavx512f", "-mfma", "-DUSE_AVX512"] if isa == "avx512" else ["-mavx2", "-mfma"]
    key = hashlib.sha1((_SRC + " ".join(flags)).encode()).hexdigest()[:12]
    d = Path(tempfile.gettempdir()) / f"autosculpt-fma-peak-{os.getuid() if hasattr(os, 'getuid') else 0}"
    d.mkdir(parents=True, exist_ok=True)
    exe = d / f"fma_{isa}_{key}"
    if exe.exists():
        return exe
    src = d / f"fma_{key}.cpp"
    src.write_text(_SRC)
    try:
        subprocess.run([cxx, "-O3", *flags, "-pthread", str(src), "-o", str(exe) + ".tmp"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(str(exe) + ".tmp", exe)
    except (subprocess.SubprocessError, OSError) as exc:
        err = getattr(exc, "stderr", "") or str(exc)
        log(f"fma_peak: compiling the {isa} loop failed: {err.strip()[:300]}")
        return None
    return exe


def _matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    import torch

    from autosculpt import timing

    with timing.threads(1):
        a, b = torch.randn(n, n), torch.randn(n, n)
        best_ms = timing.time_fn(lambda: a @ b, reps, warmup=1).min_ms
    return 2.0 * n ** 3 / (best_ms / 1e3) / 1e9


def fma_peak(threads: List[int], seconds: float = 0.15, trials: int = 9, log=print) -> Dict[str, object]:
    """{"method": str, "gflops": {threads: GFLOP/s}}. ``seconds`` is roughly each trial's length."""
    isa = "avx512" if _cpu_has("avx512f") else ("avx2" if _cpu_has("avx2") and _cpu_has("fma") else None)
    exe = _compile(isa, log) if isa else None
    if exe is not None:
        try:
            # size the loop: ~`seconds` per trial at a rough 2.5 GHz, 1 vector FMA / cycle / chain-set
            probe = subprocess.run([str(exe), "1", "2000000", "1"], check=True, capture_output=True, text=True,
                                   timeout=60)
            g = float(probe.stdout.strip())
            lanes = 16 if isa == "avx512" else 8
            iters = max(1_000_000, int(seconds * g * 1e9 / (2 * 12 * lanes)))
            out = {}
            for t in threads:
                r = subprocess.run([str(exe), str(t), str(iters), str(trials)], check=True, capture_output=True, text=True,
                                   timeout=120)
                out[t] = float(r.stdout.strip())
            return {"method": f"g++ -O3 {isa} loop: 12 independent FMA chains per thread, std::thread, best of {trials}",
                    "gflops": out}
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            log(f"fma_peak: running the FMA loop failed ({exc}); falling back to a matmul")
    g = _matmul_gflops()
    return {"method": "FALLBACK: single-thread 2048² float32 matmul GFLOP/s × threads (no FMA loop compiled)",
            "gflops": {t: g * t for t in threads}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)
    r = fma_peak(args.threads)
    print(r["method"])
    for t, g in r["gflops"].items():
        print(f"{t} thread(s): {g:.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
