/* y = x W^T + b for the few rows of a streaming step, streaming the weights once at memory speed: fp32
 * (AVX-512F), and bf16 (AVX512-BF16's pairwise dot product, fp32 sums, one rounding to bf16 at the end).
 *
 * W is packed once (rows_kernel.py) as [ceil(N/16)][K][16]: for each block of 16 output columns, the 16 weights
 * of every input k side by side, zero-padded past N.  A tile keeps up to 12 rows x 32 columns of sums in 24
 * AVX-512 registers and walks k once: two 64-byte weight loads feed 2 x rows multiply-adds, so a 7-row step
 * reads its weights sequentially at close to a plain read (oneDNN's kernel read them at ~5.5 GB/s on one
 * core, this one at ~9-10).  Row tiles of one column block follow each other, so more rows re-read that block
 * from cache, not memory.  Every output is sum_k x[m][k] w[n][k] in k order, whatever the tile: a row's
 * result does not depend on the other rows in the call (batched equals alone, bit for bit).
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define PREFETCH_FLOATS 1024 /* 4 KB ahead in the block: measured no slower than none, faster on some shapes */
#define TILE_ROWS 12

static inline __attribute__((always_inline)) __mmask16 tail_mask(int left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* rows [0, M) of x against the two column blocks at w0 (columns c0 .. c0+31, the second maybe partial) */
static inline __attribute__((always_inline)) void tile_two_blocks(const int M, int N, int K, const float* x,
                                                                  const float* w0, const float* b, float* y,
                                                                  int c0) {
  const float* w1 = w0 + (size_t)K * 16;
  __m512 s0[TILE_ROWS], s1[TILE_ROWS];
  for (int m = 0; m < M; m++) { s0[m] = _mm512_setzero_ps(); s1[m] = _mm512_setzero_ps(); }
  for (int k = 0; k < K; k++) {
    const __m512 v0 = _mm512_loadu_ps(w0 + (size_t)k * 16), v1 = _mm512_loadu_ps(w1 + (size_t)k * 16);
    _mm_prefetch((const char*)(w0 + (size_t)k * 16 + PREFETCH_FLOATS), _MM_HINT_T0);
    _mm_prefetch((const char*)(w1 + (size_t)k * 16 + PREFETCH_FLOATS), _MM_HINT_T0);
    for (int m = 0; m < M; m++) {
      const __m512 xm = _mm512_set1_ps(x[(size_t)m * K + k]);
      s0[m] = _mm512_fmadd_ps(xm, v0, s0[m]);
      s1[m] = _mm512_fmadd_ps(xm, v1, s1[m]);
    }
  }
  const __mmask16 second = tail_mask(N - c0 - 16);
  const __m512 b0 = b ? _mm512_loadu_ps(b + c0) : _mm512_setzero_ps();
  const __m512 b1 = b ? _mm512_maskz_loadu_ps(second, b + c0 + 16) : _mm512_setzero_ps();
  for (int m = 0; m < M; m++) {
    _mm512_storeu_ps(y + (size_t)m * N + c0, _mm512_add_ps(s0[m], b0));
    _mm512_mask_storeu_ps(y + (size_t)m * N + c0 + 16, second, _mm512_add_ps(s1[m], b1));
  }
}

/* the last column block alone, when the number of blocks is odd */
static inline __attribute__((always_inline)) void tile_one_block(const int M, int N, int K, const float* x,
                                                                 const float* w0, const float* b, float* y,
                                                                 int c0) {
  __m512 s0[TILE_ROWS];
  for (int m = 0; m < M; m++) s0[m] = _mm512_setzero_ps();
  for (int k = 0; k < K; k++) {
    const __m512 v0 = _mm512_loadu_ps(w0 + (size_t)k * 16);
    for (int m = 0; m < M; m++) s0[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[(size_t)m * K + k]), v0, s0[m]);
  }
  const __mmask16 cols = tail_mask(N - c0);
  const __m512 b0 = b ? _mm512_maskz_loadu_ps(cols, b + c0) : _mm512_setzero_ps();
  for (int m = 0; m < M; m++) _mm512_mask_storeu_ps(y + (size_t)m * N + c0, cols, _mm512_add_ps(s0[m], b0));
}

/* The row count is a compile-time constant in each case, so the sums stay in registers. */
#define BY_ROWS(TILE)                                                                                     \
  switch (rows) {                                                                                         \
    case 1: TILE(1); break; case 2: TILE(2); break; case 3: TILE(3); break; case 4: TILE(4); break;       \
    case 5: TILE(5); break; case 6: TILE(6); break; case 7: TILE(7); break; case 8: TILE(8); break;       \
    case 9: TILE(9); break; case 10: TILE(10); break; case 11: TILE(11); break; case 12: TILE(12); break; \
  }

/* Every tile of the column blocks [block_begin, block_end): pairs of blocks, then a last odd block, each in row
 * tiles of at most TILE_ROWS; TWO(r) and ONE(r) compute one tile of r rows at row m0, block nb, weights w0. */
#define WALK_TILES(T, TWO, ONE)                                                       \
  int nb = block_begin;                                                               \
  for (; nb + 1 < block_end; nb += 2) {                                               \
    const T* w0 = packed + (size_t)nb * K * 16;                                       \
    for (int m0 = 0; m0 < M; m0 += TILE_ROWS) {                                       \
      const int rows = M - m0 < TILE_ROWS ? M - m0 : TILE_ROWS;                       \
      BY_ROWS(TWO)                                                                    \
    }                                                                                 \
  }                                                                                   \
  if (nb < block_end) {                                                               \
    const T* w0 = packed + (size_t)nb * K * 16;                                       \
    for (int m0 = 0; m0 < M; m0 += TILE_ROWS) {                                       \
      const int rows = M - m0 < TILE_ROWS ? M - m0 : TILE_ROWS;                       \
      BY_ROWS(ONE)                                                                    \
    }                                                                                 \
  }

/* y [M][N] (row-major) = x [M][K] (row-major) W^T + b (b may be NULL), for the column blocks
 * [block_begin, block_end) of the packed W; block_begin must be even (blocks go in pairs).  Returns 0, or -1
 * for arguments out of range. */
int fp32_rows_linear(int M, int N, int K, const float* x, const float* packed, const float* b, float* y,
                     int block_begin, int block_end) {
  const int blocks = (N + 15) / 16;
  if (M < 1 || N < 1 || K < 1 || block_begin < 0 || (block_begin & 1) || block_end > blocks) return -1;
#define TWO(r) tile_two_blocks(r, N, K, x + (size_t)m0 * K, w0, b, y + (size_t)m0 * N, nb * 16)
#define ONE(r) tile_one_block(r, N, K, x + (size_t)m0 * K, w0, b, y + (size_t)m0 * N, nb * 16)
  WALK_TILES(float, TWO, ONE)
  return 0;
}

/* ---- bf16 ----------------------------------------------------------------------------------------------
 * W packed as [ceil(N/16)][K/2][16][2] bf16: for each block of 16 columns and each pair of inputs k, k+1, the
 * two weights of every column side by side, which is the operand layout of vdpbf16ps.  x is bf16 [M][K] with K
 * even, so x[m][k], x[m][k+1] are one 32-bit word to broadcast.  Compiled for AVX512-BF16 per function, so
 * the library loads on CPUs without it; Python calls these only where /proc/cpuinfo lists avx512_bf16. */
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

BF16_TARGET static inline void store_bf16_row(uint16_t* y, __m512 sums, const uint16_t* b, __mmask16 cols) {
  if (b) {  /* bf16 -> fp32 is a 16-bit shift */
    const __m512i bias = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(cols, b)), 16);
    sums = _mm512_add_ps(sums, _mm512_castsi512_ps(bias));
  }
  _mm256_mask_storeu_epi16(y, cols, (__m256i)_mm512_cvtneps_pbh(sums));
}

BF16_TARGET static inline __attribute__((always_inline)) void bf16_tile_two_blocks(
    const int M, int N, int K, const uint16_t* x, const uint16_t* w0, const uint16_t* b, uint16_t* y, int c0) {
  const uint16_t* w1 = w0 + (size_t)K * 16;
  __m512 s0[TILE_ROWS], s1[TILE_ROWS];
  for (int m = 0; m < M; m++) { s0[m] = _mm512_setzero_ps(); s1[m] = _mm512_setzero_ps(); }
  for (int k = 0; k < K; k += 2) {
    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(w0 + (size_t)k * 16);
    const __m512bh v1 = (__m512bh)_mm512_loadu_si512(w1 + (size_t)k * 16);
    _mm_prefetch((const char*)(w0 + (size_t)k * 16 + 2 * PREFETCH_FLOATS), _MM_HINT_T0);
    _mm_prefetch((const char*)(w1 + (size_t)k * 16 + 2 * PREFETCH_FLOATS), _MM_HINT_T0);
    for (int m = 0; m < M; m++) {
      const __m512bh xm = (__m512bh)_mm512_set1_epi32(*(const int32_t*)(x + (size_t)m * K + k));
      s0[m] = _mm512_dpbf16_ps(s0[m], xm, v0);
      s1[m] = _mm512_dpbf16_ps(s1[m], xm, v1);
    }
  }
  const __mmask16 second = tail_mask(N - c0 - 16);
  for (int m = 0; m < M; m++) {
    store_bf16_row(y + (size_t)m * N + c0, s0[m], b ? b + c0 : NULL, 0xFFFF);
    store_bf16_row(y + (size_t)m * N + c0 + 16, s1[m], b ? b + c0 + 16 : NULL, second);
  }
}

BF16_TARGET static inline __attribute__((always_inline)) void bf16_tile_one_block(
    const int M, int N, int K, const uint16_t* x, const uint16_t* w0, const uint16_t* b, uint16_t* y, int c0) {
  __m512 s0[TILE_ROWS];
  for (int m = 0; m < M; m++) s0[m] = _mm512_setzero_ps();
  for (int k = 0; k < K; k += 2) {
    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(w0 + (size_t)k * 16);
    for (int m = 0; m < M; m++)
      s0[m] = _mm512_dpbf16_ps(s0[m], (__m512bh)_mm512_set1_epi32(*(const int32_t*)(x + (size_t)m * K + k)), v0);
  }
  const __mmask16 cols = tail_mask(N - c0);
  for (int m = 0; m < M; m++) store_bf16_row(y + (size_t)m * N + c0, s0[m], b ? b + c0 : NULL, cols);
}

/* As fp32_rows_linear, in bf16 (bits as uint16); K must be even. */
BF16_TARGET int bf16_rows_linear(int M, int N, int K, const uint16_t* x, const uint16_t* packed, const uint16_t* b,
                                 uint16_t* y, int block_begin, int block_end) {
  const int blocks = (N + 15) / 16;
  if (M < 1 || N < 1 || K < 2 || (K & 1) || block_begin < 0 || (block_begin & 1) || block_end > blocks) return -1;
#define BF_TWO(r) bf16_tile_two_blocks(r, N, K, x + (size_t)m0 * K, w0, b, y + (size_t)m0 * N, nb * 16)
#define BF_ONE(r) bf16_tile_one_block(r, N, K, x + (size_t)m0 * K, w0, b, y + (size_t)m0 * N, nb * 16)
  WALK_TILES(uint16_t, BF_TWO, BF_ONE)
  return 0;
}

/* ---- residual add + layer norm, for the bf16 compute path ------------------------------------------------
 * For each of M rows of D (D a multiple of 16): r = res_in + alpha y (y bf16; no add when y is NULL), stored
 * to res_out (fp32; may be res_in; not stored when NULL; D <= 8192), then LayerNorm(r) = (r - mean) / sqrt(var + eps)
 * gamma + beta (fp32 gamma, beta) written to out, as bf16 (out_bf16) or fp32.  The residual stream stays fp32
 * between a layer's blocks while their products run in bf16; in torch that mix costs a pass per cast and per
 * mixed-dtype add, here it is one pass over the row.  Each row's sums go in a fixed order: a row's result
 * never depends on the other rows (batched equals alone, bit for bit). */
BF16_TARGET static inline __m512 bf16x16_to_fp32(__m256i v) {  /* bf16 -> fp32 is a 16-bit shift */
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* mean and 1 / sqrt(var + eps) of a row of D fp32 values (D a multiple of 16): two passes, each with four
 * independent sums so the adds do not wait on each other, in a fixed order all the same. */
BF16_TARGET static inline void row_stats(const float* row, int D, float eps, __m512* mean, __m512* rstd) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int j = 0;
  for (; j + 64 <= D; j += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(row + j));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(row + j + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(row + j + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(row + j + 48));
  }
  for (; j < D; j += 16) a0 = _mm512_add_ps(a0, _mm512_loadu_ps(row + j));
  *mean = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) / (float)D);
#define CENTERED_SQUARE(at) \
  _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row + (at)), *mean), _mm512_sub_ps(_mm512_loadu_ps(row + (at)), *mean))
  a0 = a1 = a2 = a3 = _mm512_setzero_ps();
  for (j = 0; j + 64 <= D; j += 64) {
    a0 = _mm512_add_ps(a0, CENTERED_SQUARE(j));
    a1 = _mm512_add_ps(a1, CENTERED_SQUARE(j + 16));
    a2 = _mm512_add_ps(a2, CENTERED_SQUARE(j + 32));
    a3 = _mm512_add_ps(a3, CENTERED_SQUARE(j + 48));
  }
  for (; j < D; j += 16) a0 = _mm512_add_ps(a0, CENTERED_SQUARE(j));
#undef CENTERED_SQUARE
  const float var = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) / (float)D;
  *rstd = _mm512_set1_ps(1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(var + eps))));
}

BF16_TARGET int bf16_add_layer_norm(int M, int D, const float* res_in, const uint16_t* y, float alpha,
                                    float* res_out, const float* gamma, const float* beta, float eps,
                                    void* out, int out_bf16) {
  if (M < 1 || D < 16 || (D & 15) || D > 8192) return -1;
  float row[8192] __attribute__((aligned(64)));
  const __m512 a = _mm512_set1_ps(alpha);
  for (int m = 0; m < M; m++) {
    const float* r = res_in + (size_t)m * D;
    const uint16_t* ym = y ? y + (size_t)m * D : NULL;
    float* keep = res_out ? res_out + (size_t)m * D : row;
    for (int j = 0; j < D; j += 16) {
      __m512 v = _mm512_loadu_ps(r + j);
      if (ym) v = _mm512_fmadd_ps(a, bf16x16_to_fp32(_mm256_loadu_si256((const __m256i*)(ym + j))), v);
      _mm512_storeu_ps(keep + j, v);
    }
    __m512 mean, rstd;
    row_stats(keep, D, eps, &mean, &rstd);
    for (int j = 0; j < D; j += 16) {
      const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(keep + j), mean), rstd);
      const __m512 o = _mm512_fmadd_ps(c, _mm512_loadu_ps(gamma + j), _mm512_loadu_ps(beta + j));
      if (out_bf16)
        _mm256_storeu_si256((__m256i*)((uint16_t*)out + (size_t)m * D + j), (__m256i)_mm512_cvtneps_pbh(o));
      else
        _mm512_storeu_ps((float*)out + (size_t)m * D + j, o);
    }
  }
  return 0;
}

/* ---- the subsampling's first convolution, for the bf16 compute path ---------------------------------------
 * out[r] = relu(b + sum_k p[r][k] w[k]) for R rows of K taps (the 3x3 windows of the log-mel) and N output
 * channels (N a multiple of 16), stored as bf16, or as fp32 with `f32_out` (for a depthwise convolution after it
 * that computes in fp32): the convolution's product, bias, ReLU and cast in one pass per row, in registers.  Its
 * output is the largest tensor of a step; through torch it was written four times (the bias broadcast into it,
 * the product, the ReLU, the cast).  A row's sums go in k order: batched equals alone, bit for bit. */
BF16_TARGET static inline __attribute__((always_inline)) void conv_taps_block(
    const int nb, int K, int N, const float* pr, const float* w, const float* b, void* o, int f32_out) {
  __m512 s[8];
  for (int i = 0; i < nb; i++) s[i] = b ? _mm512_loadu_ps(b + i * 16) : _mm512_setzero_ps();
  for (int k = 0; k < K; k++) {
    const __m512 x = _mm512_set1_ps(pr[k]);
    for (int i = 0; i < nb; i++) s[i] = _mm512_fmadd_ps(x, _mm512_loadu_ps(w + (size_t)k * N + i * 16), s[i]);
  }
  for (int i = 0; i < nb; i++) {
    const __m512 y = _mm512_max_ps(s[i], _mm512_setzero_ps());
    if (f32_out)
      _mm512_storeu_ps((float*)o + i * 16, y);
    else
      _mm256_storeu_si256((__m256i*)((uint16_t*)o + i * 16), (__m256i)_mm512_cvtneps_pbh(y));
  }
}

BF16_TARGET int bf16_conv_taps_relu(int R, int K, int N, const float* p, const float* w, const float* b,
                                    void* out, int f32_out) {
  if (R < 1 || K < 1 || N < 16 || (N & 15)) return -1;
  const int blocks = N / 16;
  const size_t item = f32_out ? 4 : 2;
  for (int r = 0; r < R; r++) {
    const float* pr = p + (size_t)r * K;
    for (int c = 0; c < blocks; c += 8) {  /* 8 blocks of 16 channels: 8 registers of sums */
      const float* bc = b ? b + c * 16 : NULL;
      void* o = (char*)out + ((size_t)r * N + c * 16) * item;
      switch (blocks - c < 8 ? blocks - c : 8) {
#define CASE(n) case n: conv_taps_block(n, K, N, pr, w + c * 16, bc, o, f32_out); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
      }
    }
  }
  return 0;
}

/* ---- the subsampling's first two convolutions (dw_striding), for the bf16 compute path ---------------------
 * x fp32 [B][T0][F0]: the log-mel, each stream's tail already zeroed.  First convolution (one input channel ->
 * C, 3x3, stride 2, padding 2 before: h[r][f] = relu(b0 + sum_k taps(r, f)[k] w0[k]), w0 [9][C]), then the
 * depthwise convolution (3x3, stride 2, padding 2 before: out[t][f] = b2 + sum_{i,j} w2[3i+j] h[2t+i-2][2f+j-2],
 * w2 [9][C]), all fp32.  h is zero outside rows [0, rows1[b]) and columns [0, F1): what the masking between the
 * convolutions leaves.  out fp32 [B][T2][F2][C] holds the causal outputs only.  h never reaches memory: its rows
 * are made as the depthwise convolution needs them, into a 3-row ring (3 x F1 x C floats, in cache); through
 * torch h was the largest tensor of a step (~22 MB fp32 at 16 streams), written once and read back by oneDNN's
 * depthwise convolution.  Sums go from the bias in tap order and streams are independent: batched equals alone,
 * bit for bit; h equals `bf16_conv_taps_relu`'s fp32 output bit for bit. */
BF16_TARGET static void first_conv_row(int r, int T0, int F0, const float* x, int F1, int C, const float* w0,
                                       const float* b0, float* row) {
  for (int f = 0; f < F1; f++) {
    float taps[9];
    for (int i = 0; i < 3; i++)
      for (int j = 0; j < 3; j++) {
        const int t = 2 * r + i - 2, q = 2 * f + j - 2;
        taps[3 * i + j] = (t >= 0 && t < T0 && q >= 0 && q < F0) ? x[(size_t)t * F0 + q] : 0.0f;
      }
    for (int c = 0; c < C / 16; c += 8) {
      const float* bc = b0 ? b0 + c * 16 : NULL;
      float* o = row + (size_t)f * C + c * 16;
      switch (C / 16 - c < 8 ? C / 16 - c : 8) {
#define CASE(n) case n: conv_taps_block(n, 9, C, taps, w0 + c * 16, bc, o, 1); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
      }
    }
  }
}

BF16_TARGET int subsample_first_two(int B, int T0, int F0, const float* x, const int* rows1, int F1, int C,
                                    const float* w0, const float* b0, const float* w2, const float* b2, int T2,
                                    int F2, float* out) {
  if (B < 1 || T0 < 1 || F0 < 1 || F1 < 1 || C < 16 || (C & 15) || T2 < 0 || F2 < 1) return -1;
  float* ring = (float*)malloc(sizeof(float) * 3 * (size_t)F1 * C);
  if (!ring) return -2;
  for (int b = 0; b < B; b++) {
    const float* xb = x + (size_t)b * T0 * F0;
    const int rows = rows1[b];
    int made = 0;  /* h rows [0, made) have been made; row r lives in ring slot r % 3 */
    for (int t = 0; t < T2; t++) {
      for (; made <= 2 * t && made < rows; made++)
        first_conv_row(made, T0, F0, xb, F1, C, w0, b0, ring + (size_t)(made % 3) * F1 * C);
      for (int f = 0; f < F2; f++) {
        float* o = out + (((size_t)b * T2 + t) * F2 + f) * C;
        for (int c = 0; c < C; c += 16) {
          __m512 s = b2 ? _mm512_loadu_ps(b2 + c) : _mm512_setzero_ps();
          for (int i = 0; i < 3; i++) {
            const int r = 2 * t + i - 2;
            if (r < 0 || r >= rows) continue;
            const float* hr = ring + (size_t)(r % 3) * F1 * C;
            for (int j = 0; j < 3; j++) {
              const int q = 2 * f + j - 2;
              if (q < 0 || q >= F1) continue;
              s = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + (3 * i + j) * C + c), _mm512_loadu_ps(hr + (size_t)q * C + c),
                                  s);
            }
          }
          _mm512_storeu_ps(o + c, s);
        }
      }
    }
  }
  free(ring);
  return 0;
}

/* ---- an int8 ring's rows, dequantized (`--kv-dtype int8`, chorus/cache/quantized.py) -----------------------
 * For r < R (r = b H + h): out[b][h][c] = q[rows[r]][c] * scale, with C int8 channels a row (C a multiple of 16).
 * The scale is per row (fp32 scales[rows[r]]: values, conv inputs) or, with `channel_scales`, per channel (fp16
 * scales[srows[r]][c]: keys).  out (fp32, or bf16 with `out_bf16`) is strided: row (b, h) at b * out_b + h * out_h
 * elements, so the history lands straight in its part of the window.  Through torch a read was two gathers, two
 * casts and a product, each a pass over the rows. */
BF16_TARGET int int8_rows_dequant(int R, int H, int C, const int8_t* q, const int64_t* rows, const void* scales,
                                  const int64_t* srows, int channel_scales, void* out, int64_t out_b, int64_t out_h,
                                  int out_bf16) {
  if (R < 0 || H < 1 || C < 16 || (C & 15)) return -1;
  for (int r = 0; r < R; r++) {
    const int8_t* qr = q + rows[r] * (int64_t)C;
    const int64_t at = (r / H) * out_b + (r % H) * out_h;
    const uint16_t* sc = channel_scales ? (const uint16_t*)scales + srows[r] * (int64_t)C : NULL;
    const __m512 s_row = _mm512_set1_ps(channel_scales ? 0.0f : ((const float*)scales)[rows[r]]);
    for (int c = 0; c < C; c += 16) {
      const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(qr + c))));
      const __m512 s = sc ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sc + c))) : s_row;
      const __m512 y = _mm512_mul_ps(x, s);
      if (out_bf16)
        _mm256_storeu_si256((__m256i*)((uint16_t*)out + at + c), (__m256i)_mm512_cvtneps_pbh(y));
      else
        _mm512_storeu_ps((float*)out + at + c, y);
    }
  }
  return 0;
}

/* ---- e^x and the functions built on it, for the bf16 path's kernels below ---------------------------------- */
BF16_TARGET static inline __m512 exp512(__m512 x) {
  /* e^x = 2^n e^r, r = x - n ln2 in [-ln2/2, ln2/2]; degree-7 Taylor polynomial (relative error < 2e-7, far
   * below the bf16 rounding that follows); inputs clamped where e^x is 0 or inf in fp32. */
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);       /* ln2, high part */
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068203094173e-06f), r);        /* ln2, low part */
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

/* 1 / (1 + e^-x), x sigmoid(x) (Swish) and tanh, from exp512: within ~2e-7 relative of the exact values. */
BF16_TARGET static inline __m512 exp_neg_plus_one(__m512 x) {
  return _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), x)));
}

BF16_TARGET static inline __m512 sigmoid512(__m512 x) {
  return _mm512_div_ps(_mm512_set1_ps(1.0f), exp_neg_plus_one(x));
}

BF16_TARGET static inline __m512 swish512(__m512 x) { return _mm512_div_ps(x, exp_neg_plus_one(x)); }

BF16_TARGET static inline __m512 tanh512(__m512 x) {  /* 2 sigmoid(2x) - 1 */
  return _mm512_fmsub_ps(_mm512_set1_ps(2.0f), sigmoid512(_mm512_add_ps(x, x)), _mm512_set1_ps(1.0f));
}

/* ---- the FastConformer convolution module's depthwise convolution + layer norm + Swish, bf16 path --------
 * window bf16 [B][K-1+T][C] (each stream's cached K-1 frames, then its T new ones), w fp32 [K][C], b fp32 [C]
 * or NULL, gamma/beta fp32 [C]; out bf16 [B][T][C] = bf16(silu(LayerNorm(b + sum_j w[j] window[t+j]))).  The
 * convolution sums in fp32 from the bias in tap order, the norm and Swish run on the fp32 sums, and the one
 * rounding is the last; through torch the window was cast, then 9 multiply-add passes, a cast, the norm and the
 * Swish each went over [B, T, C].  Rows are independent: batched equals alone, bit for bit. */
BF16_TARGET int bf16_depthwise_norm_silu(int B, int T, int K, int C, const uint16_t* window, const float* w,
                                         const float* b, const float* gamma, const float* beta, float eps,
                                         uint16_t* out) {
  if (B < 1 || T < 1 || K < 1 || C < 16 || (C & 15) || C > 8192) return -1;
  float row[8192] __attribute__((aligned(64)));
  const int frames = K - 1 + T;
  for (int s = 0; s < B; s++) {
    for (int t = 0; t < T; t++) {
      const uint16_t* x = window + ((size_t)s * frames + t) * C;
      for (int c = 0; c < C; c += 16) {
        __m512 acc = b ? _mm512_loadu_ps(b + c) : _mm512_setzero_ps();
        for (int j = 0; j < K; j++) {
          const __m512 v = bf16x16_to_fp32(_mm256_loadu_si256((const __m256i*)(x + (size_t)j * C + c)));
          acc = _mm512_fmadd_ps(v, _mm512_loadu_ps(w + (size_t)j * C + c), acc);
        }
        _mm512_storeu_ps(row + c, acc);
      }
      __m512 mean, rstd;
      row_stats(row, C, eps, &mean, &rstd);
      uint16_t* o = out + ((size_t)s * T + t) * C;
      for (int c = 0; c < C; c += 16) {
        const __m512 z = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row + c), mean), rstd),
                                         _mm512_loadu_ps(gamma + c), _mm512_loadu_ps(beta + c));
        _mm256_storeu_si256((__m256i*)(o + c), (__m256i)_mm512_cvtneps_pbh(swish512(z)));
      }
    }
  }
  return 0;
}

/* ---- attention over a ring of keys, bf16 path ---------------------------------------------------------------
 * NeMo's relative-position attention for each stream b, head h and query t over the S keys of a ring:
 *   a_s = scale ((q_u . k_s) + (q_v . p[pos[b][t][s]])) + mask[b][t][s],  w_s = e^(a_s - max a) / sum e^(a - max a),
 *   out[b][t][h] = sum_s w_s v_s.
 * q_u, q_v (the query plus pos_bias_u, pos_bias_v) and out bf16 [B][T][H][D]; k and v bf16, the key s of stream
 * b and head h at k + b * batch_stride + s * row_stride + h * D (views into the K/V ring: no copies); p bf16
 * [H][P][D] the projected relative positions, pos int32 [B][T][S] each pair's relative position (in [0, P)),
 * mask bf16 [B][T][S] (0 or -10000).  Both dot products sum bf16 pairs in fp32 (vdpbf16ps) and go into one
 * score, the softmax and the weighted sum of v run in fp32, and only the output is rounded.  Through torch this
 * was a product of every query with every relative position, a gather of the pairs' positional scores, the mask
 * add (each rounded to bf16) and the fused attention, which alone took ~1.4 ms a layer at 16 streams on these
 * 7-query rows.  D even.  Rows are independent: batched equals alone, bit for bit. */
/* sum_i of each of 16 registers, as one register (lane i: the sum of v[i]): the 16 horizontal sums in 45
 * shuffles and adds instead of ~130, pairing registers across 256-bit halves, 128-bit quarters, then lanes. */
BF16_TARGET static inline __m512 sum_each16(const __m512 v[16]) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; i++)  /* quarters of t[i]: v[i] (0+2, 1+3), v[i+8] (0+2, 1+3) */
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; i++)  /* quarters of u[i]: 4 lanes that sum to v[i], v[i+8], v[i+4], v[i+12] */
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[i], t[i + 4], 0x88), _mm512_shuffle_f32x4(t[i], t[i + 4], 0xDD));
  for (int i = 0; i < 2; i++)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(u[i], u[i + 2]), _mm512_unpackhi_ps(u[i], u[i + 2]));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x44), _mm512_shuffle_ps(w[0], w[1], 0xEE));
  /* r's quarters hold the sums of v[0, 2, 1, 3], v[8, 10, 9, 11], v[4, 6, 5, 7], v[12, 14, 13, 15] */
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), r);
}

/* 16 lanes whose sum is a . b + c . d for D bf16 values each (16 pairs a register, fp32 sums) */
BF16_TARGET static inline __m512 bf16_dot2_partial(const uint16_t* a, const uint16_t* b, const uint16_t* c,
                                                   const uint16_t* d, int D) {
#define DP(acc, x, y, at) _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + at), (__m512bh)_mm512_loadu_si512(y + at))
  if (D == 64) return DP(DP(DP(DP(_mm512_setzero_ps(), a, b, 0), a, b, 32), c, d, 0), c, d, 32);
#undef DP
  __m512 acc = _mm512_setzero_ps();
  for (int i = 0; i < D; i += 32) {
    const __mmask16 k = tail_mask((D - i) / 2);
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi32(k, a + i), (__m512bh)_mm512_maskz_loadu_epi32(k, b + i));
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi32(k, c + i), (__m512bh)_mm512_maskz_loadu_epi32(k, d + i));
  }
  return acc;
}

/* a[t][s] = q_u[t] . k[s] + q_v[t] . p[pos[t][s]] for T queries (row stride qs) and S keys (rows of D), 16 keys
 * at a time; a's rows (stride as) are padded to whole blocks of 16. */
BF16_TARGET static inline void ring_scores(int T, int S, int D, const uint16_t* q_u, const uint16_t* q_v, size_t qs,
                                           const uint16_t* k, const uint16_t* p, const int32_t* pos, float* a, int as) {
  for (int t = 0; t < T; t++)
    for (int s = 0; s < S; s += 16) {
      __m512 v[16];
      for (int i = 0; i < 16; i++)
        v[i] = s + i < S ? bf16_dot2_partial(q_u + t * qs, k + (size_t)(s + i) * D, q_v + t * qs,
                                             p + (size_t)pos[(size_t)t * S + s + i] * D, D)
                         : _mm512_setzero_ps();
      _mm512_store_ps(a + (size_t)t * as + s, sum_each16(v));
    }
}

BF16_TARGET int bf16_ring_attention(int B, int H, int T, int S, int D, int P, const uint16_t* q_u,
                                    const uint16_t* q_v, const uint16_t* k, const uint16_t* v, int64_t batch_stride,
                                    int64_t row_stride, const uint16_t* p, const int32_t* pos, const uint16_t* mask,
                                    float scale, uint16_t* out) {
  if (B < 1 || H < 1 || T < 1 || S < 1 || P < 1 || D < 2 || (D & 1)) return -1;
  for (size_t i = 0; i < (size_t)B * T * S; i++)
    if (pos[i] < 0 || pos[i] >= P) return -1;
  const int as = (S + 15) & ~15, dp = (D + 15) & ~15;
  /* One workspace: the scores, then weights, [T][as]; one head's values in fp32, [S][dp]; and a stream's keys
   * and values by head, [H][S][D] each, copied out of the ring row by row, so that the window is read in order
   * (each ring row holds every head's key and value; read head by head, the rows, kilobytes apart, all fell in
   * one set of the L1 cache and missed the prefetchers). */
  const size_t floats = (size_t)T * as + (size_t)S * dp, halves = (size_t)2 * H * S * D;
  float* a = aligned_alloc(64, (floats * sizeof(float) + halves * sizeof(uint16_t) + 63) & ~(size_t)63);
  if (!a) return -1;
  float* vf = a + (size_t)T * as;
  uint16_t* kc = (uint16_t*)(vf + (size_t)S * dp);
  uint16_t* vc = kc + (size_t)H * S * D;
  const __m512 sc = _mm512_set1_ps(scale);
  for (int b = 0; b < B; b++) {
    for (int s = 0; s < S; s++) {
      const uint16_t* ks = k + b * batch_stride + s * row_stride;
      const uint16_t* vs = v + b * batch_stride + s * row_stride;
      for (int h = 0; h < H; h++)
        for (int c = 0; c < D; c += 16) {
          const __mmask16 m = tail_mask(D - c);
          const size_t at = ((size_t)h * S + s) * D + c, from = (size_t)h * D + c;
          _mm256_mask_storeu_epi16(kc + at, m, _mm256_maskz_loadu_epi16(m, ks + from));
          _mm256_mask_storeu_epi16(vc + at, m, _mm256_maskz_loadu_epi16(m, vs + from));
        }
    }
    for (int h = 0; h < H; h++) {
      const uint16_t* vh = vc + (size_t)h * S * D;
      for (int s = 0; s < S; s++)
        for (int c = 0; c < dp; c += 16)
          _mm512_store_ps(vf + (size_t)s * dp + c,
                          bf16x16_to_fp32(_mm256_maskz_loadu_epi16(tail_mask(D - c), vh + (size_t)s * D + c)));
      const size_t q0 = ((size_t)b * T * H + h) * D;
      ring_scores(T, S, D, q_u + q0, q_v + q0, (size_t)H * D, kc + (size_t)h * S * D, p + (size_t)h * P * D,
                  pos + (size_t)b * T * S, a, as);
      for (int t = 0; t < T; t++) {
        float* at = a + (size_t)t * as;
        const uint16_t* mt = mask + ((size_t)b * T + t) * S;
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int s = 0; s < S; s += 16) {
          const __mmask16 m = tail_mask(S - s);
          const __m512 x = _mm512_fmadd_ps(_mm512_load_ps(at + s), sc, bf16x16_to_fp32(_mm256_maskz_loadu_epi16(m, mt + s)));
          _mm512_store_ps(at + s, x);
          top = _mm512_mask_max_ps(top, m, top, x);
        }
        const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        __m512 total = _mm512_setzero_ps();
        for (int s = 0; s < S; s += 16) {
          const __m512 e = _mm512_maskz_mov_ps(tail_mask(S - s), exp512(_mm512_sub_ps(_mm512_load_ps(at + s), most)));
          _mm512_store_ps(at + s, e);
          total = _mm512_add_ps(total, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
        uint16_t* o = out + (((size_t)b * T + t) * H + h) * D;
        for (int c = 0; c < dp; c += 64) {  /* up to four registers of sums: independent chains */
          __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
          const float* vcol = vf + c;
          if (dp - c >= 64) {
            for (int s = 0; s < S; s++) {
              const __m512 w = _mm512_set1_ps(at[s]);
              const float* vs = vcol + (size_t)s * dp;
              s0 = _mm512_fmadd_ps(w, _mm512_load_ps(vs), s0);
              s1 = _mm512_fmadd_ps(w, _mm512_load_ps(vs + 16), s1);
              s2 = _mm512_fmadd_ps(w, _mm512_load_ps(vs + 32), s2);
              s3 = _mm512_fmadd_ps(w, _mm512_load_ps(vs + 48), s3);
            }
          } else {
            for (int s = 0; s < S; s++) {
              const __m512 w = _mm512_set1_ps(at[s]);
              const float* vs = vcol + (size_t)s * dp;
              s0 = _mm512_fmadd_ps(w, _mm512_load_ps(vs), s0);
              if (dp - c > 16) s1 = _mm512_fmadd_ps(w, _mm512_load_ps(vs + 16), s1);
              if (dp - c > 32) s2 = _mm512_fmadd_ps(w, _mm512_load_ps(vs + 32), s2);
            }
          }
          const __m512 sums[4] = {s0, s1, s2, s3};
          for (int i = 0; i < 4 && c + i * 16 < D; i++)
            _mm256_mask_storeu_epi16(o + c + i * 16, tail_mask(D - c - i * 16),
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sums[i], inv)));
        }
      }
    }
  }
  free(a);
  return 0;
}

/* ---- the RNNT predictor's LSTM cell for the streams that emitted, bf16 path ---------------------------------
 * For each stream b with emit[b]: gates = hh[b] + table[labels[b]] (PyTorch's order i, f, g, o, each H wide),
 * c[b] = sigmoid(f) c[b] + sigmoid(i) tanh(g), h[b] = out[b] = sigmoid(o) tanh(c[b]), in place; the other
 * streams keep theirs.  hh is W_hh h (the product, done before), table the per-label input half of the gates
 * (heads.py).  Through torch a label step of the greedy loop was ~20 small operations on [B, 4H] and three
 * selects between old and new state; this is one pass over the emitting rows.  sigmoid and tanh come from
 * exp512 (relative error < 2e-7), so the bf16 path only uses it: fp32 decoding keeps torch's. */
BF16_TARGET int lstm_cell_emitting(int B, int H, int V, const float* hh, const float* table, const int64_t* labels,
                                   const uint8_t* emit, float* h, float* c, float* out) {
  if (B < 1 || H < 16 || (H & 15) || V < 1) return -1;
  for (int b = 0; b < B; b++) {
    if (!emit[b]) continue;
    if (labels[b] < 0 || labels[b] >= V) return -1;
    const float* g0 = hh + (size_t)b * 4 * H;
    const float* t0 = table + (size_t)labels[b] * 4 * H;
    float* hb = h + (size_t)b * H;
    float* cb = c + (size_t)b * H;
    float* ob = out + (size_t)b * H;
    for (int j = 0; j < H; j += 16) {
#define GATE(k) _mm512_add_ps(_mm512_loadu_ps(g0 + (k) * H + j), _mm512_loadu_ps(t0 + (k) * H + j))
      const __m512 i = sigmoid512(GATE(0)), f = sigmoid512(GATE(1)), g = tanh512(GATE(2)), o = sigmoid512(GATE(3));
#undef GATE
      const __m512 cn = _mm512_fmadd_ps(f, _mm512_loadu_ps(cb + j), _mm512_mul_ps(i, g));
      const __m512 hn = _mm512_mul_ps(o, tanh512(cn));
      _mm512_storeu_ps(cb + j, cn);
      _mm512_storeu_ps(hb + j, hn);
      _mm512_storeu_ps(ob + j, hn);
    }
  }
  return 0;
}
