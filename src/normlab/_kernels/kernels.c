/* normlab's CPU kernels: the four memory-bound passes every batch, per-sample and mixed norm
 * is made of, for a tensor viewed as (N, C, L) ("cf": channel-first, L positions contiguous)
 * or (N, L, C) ("cl": channels-last, C channels contiguous).
 *
 *   moments   per (n, c): mean and M2 = sum (x - mean)^2                     read x        1T
 *   affine    y = (x - center) * scale + shift, per (n, c)                  read x, write 2T
 *   reduce    per (n, c): sum dy and sum dy * (x - center)                  read dy, x    2T
 *   dx        dx = a * dy + b * (x - center) + k, per (n, c)                read 2, write 3T
 *
 * Forward + backward is then 8T, the memory limit of a normalization whose statistics do not
 * fit in cache. Moments are two-pass within blocks that stay in L1 (x is read from memory
 * once; the second pass is the corrected two-pass sum), and the blocks are merged exactly in
 * double precision (Chan et al.): no E[x^2] - E[x]^2 cancellation. Every full-size formula is
 * centred on a per-(n, c) value the caller chooses (the mean), so a large |mean| / std costs
 * no float32 digits. Per-(n, c) arrays are double; outputs are in x's type. OpenMP over
 * blocks; every sum has a fixed order for a given shape and thread count.
 *
 * kernels_impl.h holds the kernels; it is included once per element type.
 */
#include <stdint.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>

typedef int64_t i64;

#define BLOCK_BYTES 32768 /* rows of one channels-last block: stay in L1 for the second pass */
#define CF_CHUNK 4096     /* channel-first rows are summed in chunks of this many values */
#define MAX_ROWS 512      /* single-precision accumulators sum at most this many terms */
#define MIN_ROWS 32

#define MIN(a, b) ((a) < (b) ? (a) : (b))

static i64 rows_per_block(i64 c, i64 size) {
    i64 r = BLOCK_BYTES / (c * size);
    /* wide rows: at least MIN_ROWS a block anyway (the second pass then reads L2), so that
     * the per-block partial sums stay few */
    return r < MIN_ROWS ? MIN_ROWS : MIN(r, MAX_ROWS);
}

/* merge (nb, mb, qb) into (*na, *ma, *qa): Chan's exact pairwise update */
static inline void merge(double *na, double *ma, double *qa, double nb, double mb, double qb) {
    if (nb == 0.0) return;
    double n = *na + nb;
    if (qb < 0.0) qb = 0.0; /* a corrected two-pass sum can round below 0 */
    double d = mb - *ma;
    *ma += d * (nb / n);
    *qa += qb + d * d * (*na * nb / n);
    *na = n;
}

/* channels per register block of the channels-last reductions: 4 vector registers a row */
#if defined(__AVX512F__)
#define VEC_BYTES 64
#else
#define VEC_BYTES 32
#endif

#define T float
#define A float /* accumulator of one block; blocks are merged in double */
#define CB (4 * VEC_BYTES / 4)
#define S(name) name##_f32
#include "kernels_impl.h"
#undef T
#undef A
#undef CB
#undef S

#define T double
#define A double
#define CB (4 * VEC_BYTES / 8)
#define S(name) name##_f64
#include "kernels_impl.h"
