// The one CPU-feature probe of the CPU kernels, and the instruction-set choice they share.
//
// Every kernel that picks a SIMD path at run time asks cpu_features() (probed once, on first use)
// instead of calling __builtin_cpu_supports itself, so all of them agree on what the CPU has.
//
// No STL here: attn_avx512.cpp includes it and must not pull in inline library code.
#pragma once

namespace autosculpt {

struct CpuFeatures {
  bool x86 = false;       // an x86 CPU (the probe ran); false elsewhere: only portable kernels
  bool avx2_fma = false;  // AVX2 and FMA
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool amd = false;       // an AMD CPU (Zen 4 runs a 512-bit FMA as two 256-bit halves)
};

// What this CPU supports; probed on the first call, then cached.
const CpuFeatures& cpu_features();

// Instruction set a kernel runs with. The Python-facing arguments stay as they were (conv: a name,
// "" / "avx512" / "avx2" / "generic"; attention: an int 0..3); both are read into this.
enum class Isa { kAuto = 0, kGeneric = 1, kAvx2 = 2, kAvx512 = 3 };

// "" -> kAuto, "avx512", "avx2", "generic"; anything else throws std::invalid_argument.
Isa isa_from_name(const char* name);
// "avx512", "avx2" or "generic" ("auto" for kAuto).
const char* isa_name(Isa isa);
// Whether this CPU runs `isa` (kAuto and kGeneric: always).
bool cpu_supports(Isa isa);
// The widest of kAvx512, kAvx2, kGeneric this CPU runs.
Isa best_isa();

}  // namespace autosculpt
