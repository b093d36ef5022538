/* normlab's CPU kernels: the four memory-bound passes every batch, per-sample and mixed norm
 * is made of, for a tensor viewed as (N, C, L) ("cf": channel-first, L positions contiguous)
 * or (N, L, C) ("cl": channels-last, C channels contiguous).
 *
 *   moments   per (n, c): mean and M2 = sum (x - mean)^2                     read x        1T
 *   affine    y = act((x - center) * scale + shift), per (n, c)             read x, write 2T
 *   reduce    per (n, c): sum dy' and sum dy' * (x - center)                read dy, x    2T
 *   dx        dx = a * dy' + b * (x - center) + k, per (n, c)               read 2, write 3T
 *
 * act is an optional elementwise epilogue (leaky ReLU / ReLU, SiLU, exact GELU, or the TLU
 * max(v, t) with a per-(n, c) threshold t) fused into the output pass; then dy' = dy * act'(y)
 * is formed in the backward from x and the same per-(n, c) scale and shift, so nothing more is
 * saved (for SiLU and GELU the sums pass also writes dy' into dx, which the dx pass then reads
 * instead of dy: KEEPS; for the TLU it also sums dy - dy' per (n, c), the threshold's gradient:
 * THRESHOLDED).
 *
 * Forward + backward is then 8T, the memory limit of a normalization whose statistics do not
 * fit in cache. Moments are two-pass within blocks that stay in L1 (x is read from memory
 * once; the second pass is the corrected two-pass sum), and the blocks are merged exactly in
 * double precision (Chan et al.): no E[x^2] - E[x]^2 cancellation. Every full-size formula is
 * centred on a per-(n, c) value the caller chooses (the mean), so a large |mean| / std costs
 * no float32 digits. Per-(n, c) arrays are double; outputs are in x's type (float32, float64,
 * bfloat16 or float16; the half types computed in float). OpenMP over
 * blocks; every sum has a fixed order for a given shape and thread count.
 *
 * kernels_impl.h holds the kernels; it is included once per element type. Each element type
 * is its own translation unit: the build compiles this file once per NL_UNIT (1 float32,
 * 2 float64, 3 bfloat16, 4 float16), in parallel, and links the four.
 */
#include <stdint.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "mathfn.h" /* vectorisable float exp, tanh, erf, sigmoid (the activation epilogues, dyt, derf) */

typedef int64_t i64;

#ifndef NL_UNIT
#error "kernels.c is compiled once per element type: -DNL_UNIT=1 (float32) .. 4 (float16), see _build.py"
#endif
#define UNIT(k) (NL_UNIT == (k))

/* rows of one channels-last block (work item of the reductions): 64 kB, past L1 (the moments'
 * second pass reads L2), measured faster than 32 kB (which stayed in L1): fewer blocks, fewer
 * partial sums to write and merge; two threads, (32, 3136, 64), moments 0.85-1.02x and sums
 * 0.91-0.96x in float32 and bfloat16 (16 kB: 1.0-1.14x) */
#define BLOCK_BYTES 65536
#define CF_CHUNK 4096     /* channel-first rows are summed in chunks of this many values */
#define MAX_ROWS 512      /* single-precision accumulators sum at most this many terms */
#define MIN_ROWS 32

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
/* rows of one run of the channels-last element-wise passes: the run's rows of each array stay
 * in L1 while it is gone over block by block of channels (RUN_ROWS(C): for rows of C values) */
#define RUN_BYTES 8192
#define RUN_ROWS(C) MAX(1, RUN_BYTES / ((C) * (i64)sizeof(T)))

static i64 rows_per_block(i64 c, i64 size) {
    i64 r = BLOCK_BYTES / (c * size);
    /* wide rows: at least MIN_ROWS a block anyway (the second pass then reads L2), so that
     * the per-block partial sums stay few */
    return r < MIN_ROWS ? MIN_ROWS : MIN(r, MAX_ROWS);
}

/* ---- streaming (non-temporal) stores for outputs larger than the last-level cache. A plain
 * store first reads the cache line it writes (read for ownership), so an output pass that
 * writes T bytes moves 2T through memory; a streaming store writes the line whole and moves T.
 * Measured here, one thread, (32, 64, 3136) float32: the affine pass 0.71-0.90x and the input-
 * gradient pass 0.66-0.85x of plain stores; bfloat16 1.07-1.47x (its passes are bound by the
 * conversions, not memory): so float32 and float64 only (STREAMABLE). Below the threshold the
 * output stays in cache for the layer that reads it next. The passes compute a chunk of
 * STREAM_CHUNK values into an L1 buffer with their usual vectorised loop and stream it out
 * (STREAMED); each thread fences its streamed stores before the pass returns. ---- */
#include <stdarg.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif
#define STREAM_CHUNK 256
#if UNIT(1)
i64 nl_stream_min_bytes = (i64)24 << 20; /* outputs from this size on are streamed; -1: never */
#else
extern i64 nl_stream_min_bytes;
#endif

static inline int streams(i64 bytes) {
    return nl_stream_min_bytes >= 0 && bytes >= nl_stream_min_bytes;
}

/* copy from an aligned L1 buffer to dst, the 64-byte lines of dst written by streaming stores */
static inline void stream_copy(void *dst, const void *src, i64 bytes) {
    char *d = dst;
    const char *s = src;
#if defined(__AVX512F__) || defined(__AVX__)
    i64 head = (i64)((64 - (uintptr_t)d % 64) % 64);
    if (head > bytes) head = bytes;
    memcpy(d, s, (size_t)head);
    d += head, s += head, bytes -= head;
    for (; bytes >= 64; bytes -= 64, d += 64, s += 64) {
#if defined(__AVX512F__)
        _mm512_stream_si512((void *)d, _mm512_loadu_si512((const void *)s));
#else
        _mm256_stream_si256((__m256i *)d, _mm256_loadu_si256((const __m256i *)s));
        _mm256_stream_si256((__m256i *)(d + 32), _mm256_loadu_si256((const __m256i *)(s + 32)));
#endif
    }
#endif
    memcpy(d, s, (size_t)bytes);
}

static inline void stream_fence(int streamed) {
#if defined(__AVX512F__) || defined(__AVX__)
    if (streamed) _mm_sfence();
#else
    (void)streamed;
#endif
}

/* Chan's exact pairwise update, merging (nb, mb, qb) into (na, ma, qa): the weights depend on
 * the counts alone, fb = nb / (na + nb) and fq = na nb / (na + nb), so that a row of channels
 * with one count (a channels-last block) shares them and its merge vectorises (merge_row) */
static inline __attribute__((always_inline)) void merge_with(double *ma, double *qa, double mb, double qb,
                                                             double fb, double fq) {
    if (qb < 0.0) qb = 0.0; /* a corrected two-pass sum can round below 0 */
    double d = mb - *ma;
    *ma += d * fb;
    *qa += qb + d * d * fq;
}

/* merge (nb, mb, qb) into (*na, *ma, *qa) */
static inline void merge(double *na, double *ma, double *qa, double nb, double mb, double qb) {
    if (nb == 0.0) return;
    double n = *na + nb;
    merge_with(ma, qa, mb, qb, nb / n, *na * nb / n);
    *na = n;
}

/* the same for w channels that all have the counts *na and nb: (mb[c], qb[c]) into (ma[c], qa[c]) */
static inline void merge_row(double *na, double *ma, double *qa, i64 w, double nb, const double *mb,
                             const double *qb) {
    if (nb == 0.0) return;
    double n = *na + nb, fb = nb / n, fq = *na * nb / n;
#pragma omp simd
    for (i64 c = 0; c < w; c++) merge_with(&ma[c], &qa[c], mb[c], qb[c], fb, fq);
    *na = n;
}

/* The per-(n, c) coefficient arrays of a pass (centre, scale, ...) come as full (N, C) arrays or,
 * where bit j of `rowmask` is set, as one (1, C) row for every sample (the batch norms' per-channel
 * coefficients, as the engine's descriptions make them): those rows are repeated here into one
 * buffer, so that the pass indexes every coefficient as (N, C) and the caller makes no copy (the
 * channels-last element passes, which convert their coefficients to F rows first, repeat them
 * there: kernels_impl.h's coef_rows). The
 * `count` pointers to the pass's coefficient arguments follow; a repeated one is pointed at its
 * copy. Returns the buffer, to be freed after the pass (NULL with nothing to repeat); *failed
 * is set if it could not be allocated. */
static double *repeat_rows(int rowmask, i64 N, i64 C, int *failed, int count, ...) {
    *failed = 0;
    if (!rowmask || N * C == 0) return NULL;
    int k = 0;
    for (int j = 0; j < count; j++) k += rowmask >> j & 1;
    double *buf = malloc(sizeof(double) * (size_t)(k * N * C));
    if (!buf) {
        *failed = 1;
        return NULL;
    }
    va_list ap;
    va_start(ap, count);
    double *at = buf;
    for (int j = 0; j < count; j++) {
        const double **arg = va_arg(ap, const double **);
        if (!(rowmask >> j & 1) || !*arg) continue;
        for (i64 n = 0; n < N; n++) memcpy(at + n * C, *arg, sizeof(double) * (size_t)C);
        *arg = at;
        at += N * C;
    }
    va_end(ap);
    return buf;
}

/* REPEAT_ROWS(count, &coefficient, ...) at the top of a pass that has the arguments N, C and
 * rowmask: its coefficient rows repeated by repeat_rows, the buffer in rep_ (freed on every return) */
#define REPEAT_ROWS(...)                                                                                       \
    int bad_;                                                                                                  \
    double *rep_ = repeat_rows(rowmask, N, C, &bad_, __VA_ARGS__);                                         \
    if (bad_) return 1

/* The activation epilogue's functions (kernels_impl.h: act_fwd, act_grad): float versions for
 * the float-computed types, libm's for float64. Leaky ReLU passes dy where v > 0 and sl * dy
 * elsewhere (torch's convention at v = 0). */
#define EP_SIGMOID nl_sigmoidf
#define EP_ERF nl_erff
#define EP_EXP nl_expf
#define EP_EXPA nl_expf_act
#define EP_TANH nl_tanhf
/* the exact GELU and its derivative (kernels_impl.h); the half types': mathfn.h's */
#define EP_GELU S(gelu_erf)
#define EP_GELU_GRAD S(gelu_erf_grad)
/* exp(-z^2), Dynamic erf's derivative (elementwise_impl.h): on the epilogue's exp (4e-38 for 0
 * below exp(-86); float64: libm's); the half types': mathfn.h's nl_gauss_half */
#define EP_GAUSS(z) EP_EXPA(-(z) * (z))
/* the activations' sigmoid: on the epilogue's exp (EP_EXPA) */
#define EP_SIGMOIDA(v) ((F)1 / ((F)1 + EP_EXPA(-(v))))
/* M(K) once per activation code K, as a literal (see act_fwd in kernels_impl.h) */
#define ACT_SWITCH(act, M)                                                                                     \
    do {                                                                                                       \
        switch (act) {                                                                                         \
        case 2: M(2) break;                                                                                    \
        case 3: M(3) break;                                                                                    \
        case 4: M(4) break;                                                                                    \
        default: M(1) break;                                                                                   \
        }                                                                                                      \
    } while (0)

/* Whether the backward keeps dy' = dy act'(y) between its sums pass and its input-gradient pass
 * (stored in the input-gradient buffer, in x's type, as the unfused activation's backward would
 * hand it on), instead of evaluating the derivative twice: for SiLU and GELU (an exp, an erf:
 * dearer than the extra write), not for leaky ReLU (a select). */
#define KEEPS(act) ((act) == 2 || (act) == 3)

/* Whether the activation has a per-(n, c) threshold t (the TLU, 4: max(v, t)): the kernels then
 * read one (channel-first: per row; channels-last: a per-channel row, as the coefficients) and
 * the reduce passes sum dy - dy', the part of dy that goes to t. THRESHOLD(act, t, i) is the
 * threshold of channel i of a channels-last row t (NULL without one: not read, act being a
 * literal at every use). */
#define THRESHOLDED(act) ((act) == 4)
#define THRESHOLD(act, t, i) (THRESHOLDED(act) ? (t)[i] : (F)0)

/* channels per register block of the channels-last reductions: 4 vector registers a row */
#if defined(__AVX512F__)
#define VEC_BYTES 64
#else
#define VEC_BYTES 32
#endif

/* One block per element type: the statistics kernels (kernels_impl.h) and the element-wise
 * ones (elementwise_impl.h), with the math functions of that arithmetic type (EP_*: mathfn.h's
 * vectorisable float versions, libm's for float64). */

/* float32 and float64: stored and computed in their own type */
#define PAIRED 0
#define PAIRED_OUT 0
#define LD(v) (v)
#define ST(v) (v)
#if UNIT(1)
#define T float
#define F float
#define A float /* accumulator of one block; blocks are merged in double */
#define CB (4 * VEC_BYTES / 4)
#define STREAMABLE 1
#define S(name) name##_f32
#include "kernels_impl.h"
#include "elementwise_impl.h"
#include "evonorm_impl.h"
#undef T
#undef F
#undef A
#undef CB
#undef S
#endif

#if UNIT(2)
#undef EP_SIGMOID
#undef EP_ERF
#undef EP_EXP
#undef EP_EXPA
#undef EP_TANH
#define EP_SIGMOID nl_sigmoid
#define EP_ERF nl_erf
#define EP_EXP nl_exp
#define EP_EXPA nl_exp
#define EP_TANH nl_tanh
#define T double
#define F double
#define A double
#define CB (4 * VEC_BYTES / 8)
#define STREAMABLE 1
#define S(name) name##_f64
#include "kernels_impl.h"
#include "elementwise_impl.h"
#include "evonorm_impl.h"
#undef EP_SIGMOID
#undef EP_ERF
#undef EP_EXP
#undef EP_EXPA
#undef EP_TANH
#define EP_SIGMOID nl_sigmoidf
#define EP_ERF nl_erff
#define EP_EXP nl_expf
#define EP_EXPA nl_expf_act
#define EP_TANH nl_tanhf
#undef T
#undef F
#undef A
#undef CB
#undef S
#endif
#undef LD
#undef ST
#undef PAIRED
#undef PAIRED_OUT

/* Half precision: stored in 16 bits, computed and accumulated in float (blocks merged in
 * double, as above). Conversions are branch-free bit operations, so the loops stay
 * vectorised. bfloat16 is the top half of a float: widening is a shift, narrowing rounds to
 * nearest even (NaN kept a quiet NaN). float16 (IEEE binary16) after F. Giesen's
 * conversions: exponent re-biased by one multiply (subnormals included), round to nearest
 * even, overflow to infinity, NaN kept. */
typedef union { uint32_t i; float f; } bits32;

static inline float bf16_ld(uint16_t u) {
    bits32 v;
    v.i = (uint32_t)u << 16;
    return v.f;
}

/* f rounded to bfloat16, in the high half of a word (the low half is left over). NaN is told by
 * f != f, one float compare (the bit test, (i & 0x7fffffff) > 0x7f800000, took one operation
 * more a vector: Dynamic tanh's bfloat16 passes 0.96x with the compare) */
static inline uint32_t bf16_hi(float f) {
    bits32 v;
    v.f = f;
    uint32_t i = v.i;
    return f != f ? (i | 0x400000u) : i + 0x7fffu + ((i >> 16) & 1u);
}

static inline uint16_t bf16_st(float f) {
    return (uint16_t)(bf16_hi(f) >> 16);
}

static inline float f16_ld(uint16_t h) {
    bits32 v, infnan;
    v.i = (uint32_t)(h & 0x7fffu) << 13; /* exponent and mantissa */
    v.f *= 0x1p112f;                      /* re-bias the exponent (15 -> 127); subnormals exact */
    infnan.i = (uint32_t)(127 + 16) << 23;
    v.i |= v.f >= infnan.f ? 0x7f800000u : 0u;
    v.i |= (uint32_t)(h & 0x8000u) << 16;
    return v.f;
}

/* f rounded to float16, in the low half of a word (the high half 0) */
static inline uint32_t f16_bits(float f) {
    bits32 v, magic;
    v.f = f;
    uint32_t sign = v.i & 0x80000000u;
    v.i ^= sign;
    magic.i = (uint32_t)((127 - 15) + (23 - 10) + 1) << 23;
    bits32 sub = v;
    sub.f += magic.f; /* subnormal results: the addition rounds to nearest even */
    uint32_t sub_o = sub.i - magic.i;
    uint32_t nrm_o = (v.i + ((uint32_t)(15 - 127) << 23) + 0xfffu + ((v.i >> 13) & 1u)) >> 13;
    uint32_t o = v.i >= (uint32_t)(127 + 16) << 23 ? (v.i > 0x7f800000u ? 0x7e00u : 0x7c00u)
                 : v.i < (uint32_t)113 << 23 ? sub_o : nrm_o;
    return o | (sign >> 16);
}

static inline uint16_t f16_st(float f) {
    return (uint16_t)f16_bits(f);
}

#define T uint16_t
#define F float
#define A float
#define CB (4 * VEC_BYTES / 4)
#undef STREAMABLE /* (float32/float64's 1, in their units) */
#define STREAMABLE 0
/* rows read (PAIRED) and, in bfloat16, written (PAIRED_OUT) as 32-bit words of two values
 * (kernels_impl.h: block_moments2 for channels-last rows, affine_row and PAIR_STEP for
 * channel-first ones): the low and high halves of a word w, and two values as one word. Measured
 * two threads, (32, 64, 3136) bfloat16 channel-first, over one value a lane: moments 0.72,
 * sums 0.85-0.93, affine 0.88, input gradient 0.88-0.89; EvoNorm's passes 0.80-0.94. */
#define PAIRED 1
typedef uint32_t nl_pair __attribute__((aligned(2), may_alias));
#define LD_LO(w) LD((uint16_t)((w) & 0xffffu))
#define LD_HI(w) LD((uint16_t)((w) >> 16))
#undef EP_EXPA
#define EP_EXPA nl_expf_half
#undef EP_GELU
#undef EP_GELU_GRAD
#undef EP_TANH
#undef EP_ERF
#define EP_TANH nl_tanhf_half
#define EP_ERF nl_erff_half
#undef EP_GAUSS
#define EP_GAUSS nl_gauss_half
#define EP_GELU nl_gelu_half
#define EP_GELU_GRAD nl_gelu_grad_half
#if UNIT(3)
#define LD(v) bf16_ld(v)
#define ST(v) bf16_st(v)
#define ST_PAIR(lo, hi) ((bf16_hi(lo) >> 16) | (bf16_hi(hi) & 0xffff0000u)) /* all in 32-bit lanes */
#define PAIRED_OUT 1
#if defined(__AVX2__) && !defined(__AVX512F__)
/* the channels-last output rows (kernels_impl.h's CL_ROW) eight values at a time on AVX2: widened
 * by a zero extension and a shift, narrowed by bf16_hi's rounding on eight lanes and one pack.
 * Measured two threads, (32, 3136, 64) from memory, over the rows of single values (GCC's
 * vectorisation of LD, ST): affine 0.90, input gradient 0.88 (0.91-0.98 at (32, 784, 256) and
 * (128, 49, 512)). Elsewhere the words of two values are the faster (every other pass in these
 * chunks took 1.03-1.3x), so bfloat16 keeps them there. */
static inline __attribute__((always_inline)) __m256 bf16x8_in(const uint16_t *q) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)q)), 16));
}

static inline __attribute__((always_inline)) void bf16x8_out(uint16_t *dst, __m256 v) {
    const __m256i i = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(i, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(i, _mm256_set1_epi32(0x400000)),
                           _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))); /* NaN: kept, quiet */
    r = _mm256_srli_epi32(r, 16); /* (each lane below 2^16: the unsigned pack is exact) */
    _mm_storeu_si128((__m128i *)dst, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
#define CHUNK_IN(q) bf16x8_in(q)
#define CHUNK_OUT(dst, v) bf16x8_out(dst, v)
#endif
#define S(name) name##_bf16
#include "kernels_impl.h"
#include "elementwise_impl.h"
#include "evonorm_impl.h"
#undef LD
#undef ST
#undef ST_PAIR
#undef S
#endif

#if UNIT(4)
/* float16 on a CPU with F16C (x86 from 2012 on): every pass converts eight values with one
 * instruction each way (kernels_impl.h's CHUNK_ROW, through ROW_OUT and CL_ROW, for the outputs;
 * vectors of eight for the sums: row_sum, block_moments_v8, ..., EvoNorm's and Dynamic tanh/erf's
 * own) instead of the bit operations below, which stay for a CPU without it (with bfloat16's
 * words of two values, PAIRED). nl_f16c tells the package (its routing: float16 batch norm channel-first, group, layer
 * and instance norm channel-first and layer norm over the channels then run here rather than on
 * torch's kernels). Measured two threads, (32, 64, 3136) float16 from memory, over the bit
 * operations: channel-first affine 0.20, input gradient 0.25, moments 0.49, sums 0.52, group
 * norm's fused passes 0.27-0.29, EvoNorm's 0.26-0.50; channels-last (32, 3136, 64) affine and
 * input gradient 0.28, moments 0.54, sums 0.68, group and layer norm's per-sample passes 0.41-0.47,
 * EvoNorm's 0.28-0.60. */
#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#define F16C_CHUNKS 1
#define CHUNK_IN(q) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q)))
#define CHUNK_OUT(dst, v) _mm_storeu_si128((__m128i *)(dst), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT))
#undef PAIRED
#define PAIRED 0 /* (every pass's float16 loops convert eight values at a time instead) */
const int nl_f16c = 1;
#else
const int nl_f16c = 0;
#endif
#define LD(v) f16_ld(v)
#define ST(v) f16_st(v)
#define ST_PAIR(lo, hi) (f16_bits(lo) | f16_bits(hi) << 16) /* all in 32-bit lanes */
#define PAIRED_OUT 0
#define S(name) name##_f16
#include "kernels_impl.h"
#include "elementwise_impl.h"
#include "evonorm_impl.h"
#endif

/* Online normalization's control process (normlab/functional/_online_stream.py, control_scan):
 * s_t = coef[t] s_{t-1} + inc[t] over the N samples of a batch, C channels each, from s_{-1} =
 * first; keeps before[t] = s_{t-1} ((N, C)) and last = s_{N-1} ((C,)). A recurrence along the
 * batch, so one thread walks the N rows; a row's channels are independent (vectorised). */
#define SCAN(SCAN_T, NAME)                                                                                     \
    void NAME(const SCAN_T *first, const SCAN_T *coef, const SCAN_T *inc, i64 N, i64 C, SCAN_T *before,        \
              SCAN_T *last) {                                                                                  \
        for (i64 c = 0; c < C; c++) last[c] = first[c];                                                        \
        for (i64 t = 0; t < N; t++) {                                                                          \
            const SCAN_T *k = coef + t * C, *i = inc + t * C;                                                  \
            SCAN_T *b = before + t * C;                                                                        \
            _Pragma("omp simd") for (i64 c = 0; c < C; c++) {                                                  \
                b[c] = last[c];                                                                                \
                last[c] = k[c] * last[c] + i[c];                                                               \
            }                                                                                                  \
        }                                                                                                      \
    }
#if UNIT(1)
SCAN(float, nl_scan_f32)
#elif UNIT(2)
SCAN(double, nl_scan_f64)
#endif
#undef SCAN
