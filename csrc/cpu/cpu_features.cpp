#include "cpu/cpu_features.h"

#include <stdexcept>
#include <string>

namespace autosculpt {

namespace {

CpuFeatures probe() {
  CpuFeatures f;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  f.x86 = true;
  f.avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.amd = __builtin_cpu_is("amd");
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = probe();  // thread-safe one-time initialisation
  return features;
}

Isa isa_from_name(const char* c_name) {
  const std::string name(c_name ? c_name : "");
  if (name.empty()) return Isa::kAuto;
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "generic") return Isa::kGeneric;
  throw std::invalid_argument("isa: expected '', 'avx512', 'avx2' or 'generic', got '" + name + "'");
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kGeneric:
      return "generic";
    default:
      return "auto";
  }
}

bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return cpu_features().avx512f;
    case Isa::kAvx2:
      return cpu_features().avx2_fma;
    default:
      return true;
  }
}

Isa best_isa() {
  if (cpu_supports(Isa::kAvx512)) return Isa::kAvx512;
  if (cpu_supports(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kGeneric;
}

}  // namespace autosculpt
