// Block-sparse attention on the CPU: one task = one (batch, head, query block), torch-free.
//
// The driver (block_attention.cpp) packs, per (batch, head), every used key block as K^T ([d][bs],
// zero past Lk) and V ([j][dp], zero past Lk and past D), then runs tasks in parallel. A task walks
// only its kept key blocks with a flash-style online softmax (exp2 domain: the query is pre-scaled by
// scale * log2(e)), so the bs x bs score tile never leaves L1 and no L x L matrix is formed.
#pragma once
#include <cstdint>

namespace autosculpt {

struct AttnDims {
  int64_t bs;      // block size (rows of a query block, columns of a key block)
  int64_t d;       // head dim
  int64_t dp;      // head dim padded to a multiple of 16 (packed V / accumulator row stride)
  float qscale;    // softmax scale * log2(e)
};

struct AttnTask {
  const float* q;           // first row of this query block, row stride d
  int64_t nq;               // valid query rows (< bs only in the tail block)
  const float* kt;          // packed K^T of this (batch, head): block kb at kt + kb * d * bs
  const float* vp;          // packed V of this (batch, head): block kb at vp + kb * bs * dp
  const int32_t* kblocks;   // kept key blocks, ascending
  int64_t nk;               // how many
  int64_t tail_kb;          // key block whose columns >= tail_valid are past Lk (-1: none)
  int64_t tail_valid;
  float* out;               // first output row, row stride d
};

// Per-thread scratch, 64-byte aligned: qs bs*dp, s bs*bs, o bs*dp, m/l/alpha bs each.
struct AttnScratch {
  float* qs;
  float* s;
  float* o;
  float* m;
  float* l;
  float* alpha;
};

void attn_task_generic(const AttnDims& dims, const AttnTask& task, const AttnScratch& scratch);
// AVX-512 kernel: needs bs in {16, 32, 64, 128} and dp <= 256; call only when the CPU has avx512f.
void attn_task_avx512(const AttnDims& dims, const AttnTask& task, const AttnScratch& scratch);
bool attn_avx512_supported_shape(const AttnDims& dims);
// K^T of one key block (rows valid rows of src, row stride d) into dst [d][bs], zero-padded; AVX-512.
void pack_kt_avx512(const float* src, int64_t rows, int64_t d, int64_t bs, float* dst);
bool cpu_has_avx512f();

}  // namespace autosculpt
