// PackedPatternConv's constructor: groups filters by tap mask, cuts the groups into blocks of MR
// filters and packs their weights (forward paths in pattern_conv_forward.cpp, binding in
// pattern_conv_bindings.cpp).
#include <algorithm>
#include <map>
#include <stdexcept>

#include "cpu/conv_microkernels.h"
#include "cpu/pattern_conv.h"

namespace autosculpt {

namespace {

// A pixel tile's gathered input should stay in the core's L2 while every filter block reads it.
constexpr int64_t kTileBytes = 384 * 1024;
constexpr int64_t kMaxTileSubtiles = 8;   // at most 8 micro-kernel widths per tile
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

PackedPatternConv::PackedPatternConv(const float* weight, const uint8_t* tap_mask, int64_t c_out,
                                     int64_t c_in_pg, int64_t kh, int64_t kw, int64_t groups,
                                     Isa isa)
    : c_out_(c_out), c_in_pg_(c_in_pg), kh_(kh), kw_(kw), groups_(groups),
      isa_(isa == Isa::kAuto ? best_isa() : isa) {
  if (!cpu_supports(isa_))
    throw std::invalid_argument(std::string("isa: this CPU does not support '") + autosculpt::isa_name(isa_) + "'");
  if (c_out <= 0 || c_in_pg <= 0 || kh <= 0 || kw <= 0 || groups <= 0 || c_out % groups != 0)
    throw std::invalid_argument("PackedPatternConv: bad sizes");
  const int64_t taps_n = kh * kw;
  depthwise_ = (groups > 1 && c_in_pg == 1 && c_out == groups);
  if (depthwise_) {
    dw_weight_.assign(weight, weight + c_out * taps_n);
    dw_taps_.resize(c_out);
    for (int64_t co = 0; co < c_out; ++co)
      for (int64_t t = 0; t < taps_n; ++t)
        if (tap_mask[co * taps_n + t]) dw_taps_[co].push_back(int32_t(t));
    return;
  }

  switch (isa_) {
#ifdef AUTOSCULPT_X86
    case Isa::kAvx512:
      mr_ = ukernels::kAvx512MR, lanes_ = ukernels::kAvx512Lanes, nv_max_ = ukernels::kAvx512NV;
      kernels_ = ukernels::avx512_table();
      kernels2_ = ukernels::avx512_table_2panels(), mr2_max_ = ukernels::kAvx512MR2;
      break;
    case Isa::kAvx2:
      mr_ = ukernels::kAvx2MR, lanes_ = ukernels::kAvx2Lanes, nv_max_ = ukernels::kAvx2NV;
      kernels_ = ukernels::avx2_table();
      break;
#endif
    default:
      mr_ = ukernels::kGenericMR, lanes_ = ukernels::kGenericLanes, nv_max_ = ukernels::kGenericNV;
      kernels_ = ukernels::generic_table();
  }
  const int64_t sub = int64_t(lanes_) * nv_max_;

  const int64_t c_out_pg = c_out / groups;
  plans_.resize(groups);
  // First pass: group filters by mask, find the taps used, count packed floats.
  int64_t packed_floats = 0;
  for (int64_t g = 0; g < groups; ++g) {
    ConvGroupPlan& pl = plans_[g];
    std::map<std::vector<int32_t>, int> index;
    std::vector<bool> used(taps_n, false);
    for (int64_t f = 0; f < c_out_pg; ++f) {
      const int64_t co = g * c_out_pg + f;
      std::vector<int32_t> taps;
      for (int64_t t = 0; t < taps_n; ++t)
        if (tap_mask[co * taps_n + t]) taps.push_back(int32_t(t)), used[t] = true;
      if (taps.empty()) {
        pl.empty_filters.push_back(int32_t(co));
        continue;
      }
      auto it = index.find(taps);
      if (it == index.end()) {
        it = index.emplace(taps, int(pl.groups.size())).first;
        pl.groups.push_back(PatternGroup{taps, {}, {}});
      }
      pl.groups[it->second].filters.push_back(int32_t(co));
    }
    std::vector<int64_t> slot_of(taps_n, -1);
    for (int64_t t = 0; t < taps_n; ++t)
      if (used[t]) slot_of[t] = int64_t(pl.slot_taps.size()), pl.slot_taps.push_back(int32_t(t));
    const int64_t slots = int64_t(pl.slot_taps.size());
    // Tile width: a whole number of micro-kernel widths whose gathered input fits kTileBytes.
    const int64_t per_pixel = std::max<int64_t>(1, slots * c_in_pg * int64_t(sizeof(float)));
    pl.tile = std::clamp<int64_t>((kTileBytes / per_pixel) / sub, 1, kMaxTileSubtiles) * sub;
    for (auto& grp : pl.groups) {
      for (int32_t t : grp.taps) grp.tap_off.push_back(slot_of[t] * c_in_pg * sub);
      packed_floats += int64_t(grp.filters.size()) * int64_t(grp.taps.size()) * c_in_pg;
    }
  }
  // Second pass: cut groups into blocks of mr_ filters and pack each block as a K x mr panel.
  packed_.resize(size_t(packed_floats));
  int64_t off = 0;
  for (int64_t g = 0; g < groups; ++g) {
    ConvGroupPlan& pl = plans_[g];
    for (size_t gi = 0; gi < pl.groups.size(); ++gi) {
      const PatternGroup& grp = pl.groups[gi];
      const int64_t nt = int64_t(grp.taps.size()), k = nt * c_in_pg, nf = int64_t(grp.filters.size());
      // Balance block sizes (e.g. 10 filters -> 5 + 5 rather than 8 + 2: small blocks run slower).
      const int64_t nblocks = ceil_div(nf, mr_);
      int64_t f0 = 0;
      for (int64_t bi = 0; bi < nblocks; ++bi) {
        const int64_t f1 = nf * (bi + 1) / nblocks;
        FilterBlock blk{};
        blk.group = int32_t(gi);
        blk.mr = int32_t(f1 - f0);
        blk.a_offset = off;
        // Small blocks issue more loads per FMA: charge them as if a little wider.
        blk.cost = k * (blk.mr + 2);
        for (int64_t i = 0; i < blk.mr; ++i) blk.filters[i] = grp.filters[size_t(f0 + i)];
        for (int64_t ti = 0; ti < nt; ++ti)
          for (int64_t ci = 0; ci < c_in_pg; ++ci)
            for (int64_t m = 0; m < blk.mr; ++m)
              packed_[size_t(off + (ti * c_in_pg + ci) * blk.mr + m)] =
                  weight[(int64_t(blk.filters[m]) * c_in_pg + ci) * taps_n + grp.taps[size_t(ti)]];
        off += k * blk.mr;
        pl.blocks.push_back(blk);
        f0 = f1;
      }
    }
    pl.block_cost_prefix.assign(1, 0);
    for (auto& blk : pl.blocks) pl.block_cost_prefix.push_back(pl.block_cost_prefix.back() + blk.cost);
  }
}

int64_t PackedPatternConv::kept_taps() const {
  int64_t total = 0;
  if (depthwise_) {
    for (auto& t : dw_taps_) total += int64_t(t.size());
    return total;
  }
  for (auto& pl : plans_)
    for (auto& grp : pl.groups) total += int64_t(grp.taps.size() * grp.filters.size());
  return total;
}

int64_t PackedPatternConv::num_pattern_groups() const {
  int64_t total = 0;
  for (auto& pl : plans_) total += int64_t(pl.groups.size());
  return total;
}

std::string PackedPatternConv::isa_name() const {
  return autosculpt::isa_name(isa_);
}

}  // namespace autosculpt
