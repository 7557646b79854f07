// Block-sparse attention on the CPU: one task = one (batch, head, query block), torch-free.
//
// A task walks only its kept key blocks with a flash-style online softmax (exp2 domain: the query is
// pre-scaled by scale * log2(e)), so the bs x bs score tile never leaves L1 and no L x L matrix is
// formed. The AVX-512 and portable tasks work transposed (S^T = K Q^T, O^T += V^T P^T, vectorised over
// the query rows): they read K and V in place, and the softmax max/sum run down the columns without
// horizontal reductions. The generic task (any block size) uses K^T/V blocks packed once per
// (batch, head) by the driver.
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
  const float* kt;          // generic path: packed K^T of this (batch, head): block kb at kt + kb * d * bs
  const float* vp;          // generic path: packed V of this (batch, head): block kb at vp + kb * bs * dp
  const float* k;           // AVX-512/portable paths: K of this (batch, head), row stride d (in place)
  const float* v;           // AVX-512/portable paths: V of this (batch, head), row stride d
  const int32_t* kblocks;   // kept key blocks, ascending
  int64_t nk;               // how many
  int64_t tail_kb;          // key block whose columns >= tail_valid are past Lk (-1: none)
  int64_t tail_valid;
  float* out;               // first output row, row stride d
};

// Per-thread scratch, 64-byte aligned: qs bs*dp, s bs*bs, o bs*dp, m/l/alpha bs each, zeros dp.
struct AttnScratch {
  float* qs;
  float* s;
  float* o;
  float* m;
  float* l;
  float* alpha;
  const float* zeros;  // dp zeros: stands in for key rows past Lk
};

// Simple loops over packed blocks, any block size.
void attn_task_generic(const AttnDims& dims, const AttnTask& task, const AttnScratch& scratch);
// Portable transposed kernel (reads K/V in place like the AVX-512 one): bs in {16, 32, 64, 128}.
void attn_task_portable(const AttnDims& dims, const AttnTask& task, const AttnScratch& scratch);
// The same compiled for AVX2+FMA (call only when cpu_has_avx2_fma()).
void attn_task_portable_avx2(const AttnDims& dims, const AttnTask& task, const AttnScratch& scratch);
bool cpu_has_avx2_fma();
// AVX-512 kernel: needs bs in {16, 32, 64, 128} and dp <= 256; call only when the CPU has avx512f.
void attn_task_avx512(const AttnDims& dims, const AttnTask& task, const AttnScratch& scratch);
bool attn_avx512_supported_shape(const AttnDims& dims);

bool cpu_has_avx512f();

}  // namespace autosculpt
