/* The kernels for one storage type T (arithmetic type F, accumulator A, channel block CB, names
 * S(...)); LD(v) reads a T as an F, ST(v) rounds an F to a T. Included by kernels.c, which
 * documents them. */

/* ---- row reductions with LANES independent accumulators: a single vector accumulator
 * would wait on the add latency at every step ---- */
#define LANES 64

/* the exact GELU v Phi(v) = v (1 + erf(v / sqrt 2)) / 2 and its derivative Phi(v) + v phi(v) on
 * the type's erf and exp: EP_GELU and EP_GELU_GRAD of float32 and float64 (kernels.c; the half
 * types use mathfn.h's division-free nl_gelu_half, nl_gelu_grad_half) */
static inline __attribute__((always_inline)) F S(gelu_erf)(F v) {
    return (F)0.5 * v * ((F)1 + EP_ERF(v * (F)0.70710678118654752));
}

static inline __attribute__((always_inline)) F S(gelu_erf_grad)(F v) {
    return (F)0.5 * ((F)1 + EP_ERF(v * (F)0.70710678118654752)) + v * (F)0.39894228040143268 * EP_EXPA((F)-0.5 * v * v);
}

/* the activation epilogue on a normalized value v (act: 1 leaky ReLU with slope sl, ReLU at
 * sl = 0; 2 SiLU; 3 exact GELU; 4 TLU, max(v, t) with the value's threshold t) and its gradient
 * times d. Callers pass act as a literal constant through ACT_SWITCH (kernels.c), so that each
 * loop is compiled, and vectorised, once per activation with the branches folded away */
static inline __attribute__((always_inline)) F S(act_fwd)(F v, int act, F sl, F t) {
    if (act == 2) return v * EP_SIGMOIDA(v);
    if (act == 3) return EP_GELU(v);
    if (act == 4) return v < t ? t : v; /* (a NaN v stays NaN) */
    return v > 0 ? v : v * sl;
}

/* (TLU: torch.maximum's convention, a tie v = t passes half of d to each side; the threshold's
 * part, d minus this, is summed by the reduce passes: THRESHOLDED in kernels.c) */
static inline __attribute__((always_inline)) F S(act_grad)(F d, F v, int act, F sl, F t) {
    if (act == 4) { /* (the tie first, then the side: GCC's code for the nested select spent four
                     * compares on it, and more with the sums' dy - dy'; TLU sums pass 0.74x bfloat16,
                     * 0.79x float16, 0.93x float32, the same values) */
        F tie = v == t ? (F)0.5 * d : (F)0;
        return v > t ? d : tie;
    }
    if (act == 2) {
        F sg = EP_SIGMOIDA(v);
        return d * sg * ((F)1 + v * ((F)1 - sg));
    }
    if (act == 3) return d * EP_GELU_GRAD(v);
    return v > 0 ? d : d * sl;
}

/* the sum of the LANES accumulators as a tree of vector adds (a plain loop would be 64
 * dependent scalar adds: most of the work on short rows); fully unrolled, or GCC 12 keeps the
 * loops, the last levels scalar through the stack. The rows' remainders (all of a row shorter
 * than LANES: a 7 x 7 or 14 x 14 channel-first map) are simd reductions, and a row without a
 * LANES step skips the tree: float32 (128, 512, 7, 7), 2 threads, moments 6.1 -> see below */
static inline A S(lanes_total)(A *acc) {
#pragma GCC unroll 8
    for (int w = LANES / 2; w >= 1; w /= 2)
#pragma GCC unroll 32
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    return acc[0];
}

/* The 16-bit types read the LANES values of a step as LANES / 2 32-bit words of two values
 * (see block_moments2): value 2j of the step in lane j, value 2j + 1 in lane LANES / 2 + j;
 * PAIR_STEP(i, BODY) runs BODY(lane, value index) over them (the others: value j in lane j). */
#if PAIRED
#define PAIR_STEP(i, BODY)                                                                                     \
    for (int j = 0; j < LANES / 2; j++) {                                                                      \
        BODY(j, (i) + 2 * j, LO);                                                                              \
        BODY(LANES / 2 + j, (i) + 2 * j, HI);                                                                  \
    }
#define WORD_AT(a, at, half) LD_##half(((const nl_pair *)((a) + (at)))[0])
#else
#define PAIR_STEP(i, BODY)                                                                                     \
    for (int j = 0; j < LANES; j++) {                                                                          \
        BODY(j, (i) + j, LO);                                                                                  \
    }
#define WORD_AT(a, at, half) LD((a)[at])
#endif

#ifdef CHUNK_IN
/* n values (a multiple of 8) from T at src into floats at dst, and back rounded to nearest even */
static inline __attribute__((always_inline)) void S(chunk_in)(float *dst, const T *src, int n) {
    for (int v = 0; v < n; v += 8) _mm256_storeu_ps(dst + v, CHUNK_IN(src + v));
}

static inline __attribute__((always_inline)) void S(chunk_out)(T *dst, const float *src, int n) {
    for (int v = 0; v < n; v += 8) CHUNK_OUT(dst + v, _mm256_loadu_ps(src + v));
}

/* A row of k values eight at a time, each eight converted by CHUNK_IN and CHUNK_OUT (kernels.c:
 * float16 with F16C, one instruction each way, vcvtph2ps and vcvtps2ph rounding to nearest even;
 * bfloat16 on AVX2, a widening and a rounding on eight lanes), o = MAP(d, p, ARG) computed on them
 * as float32 (GCC keeps the eight in a register), the rest of the row one by one (GCC 12 does not
 * vectorise float16 conversions: written out, a value's conversions cost about 25 operations).
 * ARG may name the value's index i_ + j_ (CL_ROW's per-channel factors) */
#define CHUNK_ROW(o, d, p, k, MAP, ARG)                                                                        \
    do {                                                                                                       \
        i64 i_ = 0;                                                                                            \
        for (; i_ + 8 <= (k); i_ += 8) {                                                                       \
            float dv_[8], pv_[8], ov_[8];                                                                      \
            S(chunk_in)(dv_, (d) + i_, 8);                                                                     \
            S(chunk_in)(pv_, (p) + i_, 8);                                                                     \
            _Pragma("omp simd") for (int j_ = 0; j_ < 8; j_++) ov_[j_] = MAP(dv_[j_], pv_[j_], ARG);           \
            S(chunk_out)((o) + i_, ov_, 8);                                                                    \
        }                                                                                                      \
        for (; i_ < (k); i_++) {                                                                               \
            const int j_ = 0;                                                                                  \
            (void)j_;                                                                                          \
            (o)[i_] = ST(MAP(LD((d)[i_]), LD((p)[i_]), ARG));                                                  \
        }                                                                                                      \
    } while (0)
#endif

/* One output row of k values, o[i] = MAP(dv, pv, X) rounded to T with dv = d[i], pv = p[i] as F (MAP
 * a macro; one of p alone passes p as d and ignores dv; X is passed through, e.g. an activation
 * code as a literal): bfloat16 (PAIRED_OUT) reads and writes 32-bit words of two values (see
 * block_moments2), an odd last value alone. Used by every channel-first output pass. */
#if PAIRED_OUT
#define ROW_OUT(o, d, p, k, MAP, X)                                                                            \
    do {                                                                                                       \
        const nl_pair *dw_ = (const nl_pair *)(d), *pw_ = (const nl_pair *)(p);                                \
        nl_pair *ow_ = (nl_pair *)(o);                                                                         \
        (void)dw_; /* (a map of p alone does not read it) */                                                   \
        _Pragma("omp simd") for (i64 j_ = 0; j_ < (k) / 2; j_++) ow_[j_] =                                     \
            ST_PAIR(MAP(LD_LO(dw_[j_]), LD_LO(pw_[j_]), X), MAP(LD_HI(dw_[j_]), LD_HI(pw_[j_]), X));           \
        if ((k) & 1) (o)[(k) - 1] = ST(MAP(LD((d)[(k) - 1]), LD((p)[(k) - 1]), X));                            \
    } while (0)
#elif F16C_CHUNKS
#define ROW_OUT(o, d, p, k, MAP, X) CHUNK_ROW(o, d, p, k, MAP, X)
#else
#define ROW_OUT(o, d, p, k, MAP, X)                                                                            \
    do {                                                                                                       \
        _Pragma("omp simd") for (i64 i_ = 0; i_ < (k); i_++) (o)[i_] = ST(MAP(LD((d)[i_]), LD((p)[i_]), X));   \
    } while (0)
#endif
/* One channels-last row of C values in channel order, o[c] = MAP(d[c], p[c], c) rounded to T (the
 * coefficients per channel): ROW_OUT's loop given the channel's index, in chunks of eight where
 * the type has them (CHUNK_IN: also bfloat16 on AVX2, whose ROW_OUT reads words of two values) */
#ifdef CHUNK_IN
#define CL_ROW(o, d, p, C, MAP) CHUNK_ROW(o, d, p, C, MAP, i_ + j_)
#else
#define CL_ROW(o, d, p, C, MAP)                                                                                \
    do {                                                                                                       \
        _Pragma("omp simd") for (i64 c_ = 0; c_ < (C); c_++) (o)[c_] = ST(MAP(LD((d)[c_]), LD((p)[c_]), c_));  \
    } while (0)
#endif

#if F16C_CHUNKS
/* float16 with F16C: the three row reductions below on vectors of eight values, each read by one
 * vcvtph2ps (GCC 12 neither vectorises float16 conversions nor, written out per lane, keeps these
 * loops' accumulators in registers); value j of a step in lane j, the lanes summed by lanes_total:
 * the same sums in the same order as the generic loops for float32 */
typedef float nl_v8 __attribute__((vector_size(32)));
#define V8(q) ((nl_v8)CHUNK_IN(q))
#define NV (LANES / 8)

/* chunk_in and chunk_out for any n: the last n % 8 values one by one */
static inline __attribute__((always_inline)) void S(chunk_in_n)(float *dst, const T *src, i64 n) {
    i64 v = 0;
    for (; v + 8 <= n; v += 8) S(chunk_in)(dst + v, src + v, 8);
    for (; v < n; v++) dst[v] = LD(src[v]);
}

static inline __attribute__((always_inline)) void S(chunk_out_n)(T *dst, const float *src, i64 n) {
    i64 v = 0;
    for (; v + 8 <= n; v += 8) S(chunk_out)(dst + v, src + v, 8);
    for (; v < n; v++) dst[v] = ST(src[v]);
}

static inline A S(v8_total)(const nl_v8 *acc) {
    A lanes[LANES];
    memcpy(lanes, acc, sizeof lanes);
    return S(lanes_total)(lanes);
}

static inline A S(row_sum)(const T *p, i64 k) {
    nl_v8 acc[NV] = {0};
    A s = 0;
    i64 i = 0;
    for (; i + LANES <= k; i += LANES)
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) acc[v] += V8(p + i + 8 * v);
    for (i64 j = i; j < k; j++) s += LD(p[j]);
    return k < LANES ? s : s + S(v8_total)(acc);
}

static inline void S(row_dev)(const T *p, i64 k, A mu, A *e, A *q) {
    nl_v8 ae[NV] = {0}, aq[NV] = {0};
    A se = 0, sq = 0;
    i64 i = 0;
    for (; i + LANES <= k; i += LANES)
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) {
            nl_v8 d = V8(p + i + 8 * v) - mu;
            ae[v] += d;
            aq[v] += d * d;
        }
    for (i64 j = i; j < k; j++) {
        A d = LD(p[j]) - mu;
        se += d;
        sq += d * d;
    }
    *e = k < LANES ? se : se + S(v8_total)(ae);
    *q = k < LANES ? sq : sq + S(v8_total)(aq);
}

static inline void S(row_dot)(const T *d, const T *p, i64 k, F m, A *g, A *h) {
    nl_v8 ag[NV] = {0}, ah[NV] = {0};
    A sg = 0, sh = 0;
    i64 i = 0;
    for (; i + LANES <= k; i += LANES)
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) {
            nl_v8 dv = V8(d + i + 8 * v);
            ag[v] += dv;
            ah[v] += dv * (V8(p + i + 8 * v) - m);
        }
    for (i64 j = i; j < k; j++) {
        sg += LD(d[j]);
        sh += LD(d[j]) * (LD(p[j]) - m);
    }
    *g = k < LANES ? sg : sg + S(v8_total)(ag);
    *h = k < LANES ? sh : sh + S(v8_total)(ah);
}
#else
static inline A S(row_sum)(const T *p, i64 k) {
    A acc[LANES] = {0}, s = 0;
    i64 i = 0;
#define BODY(lane, at, half) acc[lane] += WORD_AT(p, at, half)
    for (; i + LANES <= k; i += LANES) PAIR_STEP(i, BODY)
#undef BODY
#pragma omp simd reduction(+ : s)
    for (i64 j = i; j < k; j++) s += LD(p[j]);
    return k < LANES ? s : s + S(lanes_total)(acc);
}

/* *e = sum (p - mu), *q = sum (p - mu)^2 */
static inline void S(row_dev)(const T *p, i64 k, A mu, A *e, A *q) {
    A ae[LANES] = {0}, aq[LANES] = {0}, se = 0, sq = 0;
    i64 i = 0;
#define BODY(lane, at, half)                                                                                   \
    {                                                                                                          \
        A d = WORD_AT(p, at, half) - mu;                                                                       \
        ae[lane] += d;                                                                                         \
        aq[lane] += d * d;                                                                                     \
    }
    for (; i + LANES <= k; i += LANES) PAIR_STEP(i, BODY)
#undef BODY
#pragma omp simd reduction(+ : se, sq)
    for (i64 j = i; j < k; j++) {
        A d = LD(p[j]) - mu;
        se += d;
        sq += d * d;
    }
    *e = k < LANES ? se : se + S(lanes_total)(ae);
    *q = k < LANES ? sq : sq + S(lanes_total)(aq);
}

/* *g = sum d, *h = sum d (p - m) */
static inline void S(row_dot)(const T *d, const T *p, i64 k, F m, A *g, A *h) {
    A ag[LANES] = {0}, ah[LANES] = {0}, sg = 0, sh = 0;
    i64 i = 0;
#define BODY(lane, at, half)                                                                                   \
    {                                                                                                          \
        A dv = WORD_AT(d, at, half);                                                                           \
        ag[lane] += dv;                                                                                        \
        ah[lane] += dv * (WORD_AT(p, at, half) - m);                                                           \
    }
    for (; i + LANES <= k; i += LANES) PAIR_STEP(i, BODY)
#undef BODY
#pragma omp simd reduction(+ : sg, sh)
    for (i64 j = i; j < k; j++) {
        sg += LD(d[j]);
        sh += LD(d[j]) * (LD(p[j]) - m);
    }
    *g = k < LANES ? sg : sg + S(lanes_total)(ag);
    *h = k < LANES ? sh : sh + S(lanes_total)(ah);
}

#endif

/* moments of one channel-first row, chunk by chunk (corrected two-pass, merged in double) */
static inline void S(row_moments)(const T *row, i64 L, double *na, double *ma, double *qa) {
    *na = *ma = *qa = 0.0;
    for (i64 s = 0; s < L; s += CF_CHUNK) {
        i64 k = MIN(CF_CHUNK, L - s);
        const A mu = S(row_sum)(row + s, k) / (A)k;
        A e, q;
        S(row_dev)(row + s, k, mu, &e, &q);
        /* q is about mu; the exact chunk mean is mu + e / k */
        merge(na, ma, qa, (double)k, (double)mu + (double)e / k, (double)q - (double)e * e / k);
    }
}

/* sum dy and sum dy (x - m) of one channel-first row */
static inline void S(row_sums)(const T *d, const T *p, i64 L, F m, double *sg, double *sh) {
    *sg = *sh = 0.0;
    for (i64 s = 0; s < L; s += CF_CHUNK) {
        A g, h;
        S(row_dot)(d + s, p + s, MIN(CF_CHUNK, L - s), m, &g, &h);
        *sg += g;
        *sh += h;
    }
}

/* the same with the activation's gradient applied to dy: d = dy * act'((p - m) * s + b); with
 * a threshold (THRESHOLDED(act)), *e = sum (dy - d), the threshold's part */
static inline __attribute__((always_inline)) void S(row_dot_act_)(const T *d, const T *p, i64 k, F m, F s, F b, int act, F sl, F t, T *kp, A *g, A *h, A *e) {
    A sg = 0, sh = 0, se = 0;
    i64 i = 0;
/* the terms of dy, x into the sums G, H, E; KEEP stores dd */
#define TERM(dy_, x_, G, H, E, KEEP)                                                                           \
    {                                                                                                          \
        F dy = (dy_), xc = (x_) - m, dd = S(act_grad)(dy, xc * s + b, act, sl, t);                             \
        KEEP;                                                                                                  \
        G += dd;                                                                                               \
        H += dd * xc;                                                                                          \
        if (THRESHOLDED(act)) E += dy - dd;                                                                    \
    }
#if PAIRED_OUT
    /* bfloat16: 32-bit words of two values as ev_run_red's (no LANES accumulators: the three
     * arrays of them, 24 vector registers, spilled, and the values were widened one by one;
     * the TLU's sums took twice the plain ones) */
    const nl_pair *dw = (const nl_pair *)d, *pw = (const nl_pair *)p;
    nl_pair *kw = (nl_pair *)kp;
    if (kp) {
#pragma omp simd reduction(+ : sg, sh, se)
        for (i64 j = 0; j < k / 2; j++) {
            F lo, hi;
            TERM(LD_LO(dw[j]), LD_LO(pw[j]), sg, sh, se, lo = dd)
            TERM(LD_HI(dw[j]), LD_HI(pw[j]), sg, sh, se, hi = dd)
            kw[j] = ST_PAIR(lo, hi);
        }
    } else {
#pragma omp simd reduction(+ : sg, sh, se)
        for (i64 j = 0; j < k / 2; j++) {
            TERM(LD_LO(dw[j]), LD_LO(pw[j]), sg, sh, se, (void)0)
            TERM(LD_HI(dw[j]), LD_HI(pw[j]), sg, sh, se, (void)0)
        }
    }
    i = k & ~(i64)1; /* (an odd last value below) */
#else
    A ag[LANES] = {0}, ah[LANES] = {0}, ae[LANES] = {0};
#if F16C_CHUNKS /* (eight values a step converted first, into the first eight lanes: with all LANES, the
                * three arrays spilled; reduce with the TLU 0.83x, ReLU 0.87x, SiLU kept 0.80x) */
    for (; i + 8 <= k; i += 8) {
        float dv[8], pv[8], kv[8];
        S(chunk_in)(dv, d + i, 8);
        S(chunk_in)(pv, p + i, 8);
#pragma omp simd
        for (int j = 0; j < 8; j++) TERM(dv[j], pv[j], ag[j], ah[j], ae[j], kv[j] = dd)
        if (kp) S(chunk_out)(kp + i, kv, 8);
    }
#else
    for (; i + LANES <= k; i += LANES)
        for (int j = 0; j < LANES; j++)
            TERM(LD(d[i + j]), LD(p[i + j]), ag[j], ah[j], ae[j], if (kp) kp[i + j] = ST(dd))
#endif
#endif
#pragma omp simd reduction(+ : sg, sh, se)
    for (i64 j = i; j < k; j++) TERM(LD(d[j]), LD(p[j]), sg, sh, se, if (kp) kp[j] = ST(dd))
#undef TERM
#if !PAIRED_OUT
    if (i) { /* (the lanes after the rest, the order of before) */
        sg += S(lanes_total)(ag);
        sh += S(lanes_total)(ah);
        se += S(lanes_total)(ae);
    }
#endif
    *g = sg;
    *h = sh;
    *e = THRESHOLDED(act) ? se : 0;
}

/* (kp tested once, outside the loops: a store under a condition inside them stays scalar where
 * the CPU has no masked store of the element's width, 16-bit ones on AVX2: float16 FRN's
 * backward ran a branch a value, 10x slower) */
static inline __attribute__((always_inline)) void S(row_dot_act)(const T *d, const T *p, i64 k, F m, F s, F b, int act, F sl, F t, T *kp, A *g, A *h, A *e) {
    if (kp)
        S(row_dot_act_)(d, p, k, m, s, b, act, sl, t, kp, g, h, e);
    else
        S(row_dot_act_)(d, p, k, m, s, b, act, sl, t, NULL, g, h, e);
}

/* (kp: where to keep dy', or NULL) */
static inline __attribute__((always_inline)) void S(row_sums_act)(const T *d, const T *p, i64 L, F m, F s, F b, int act, F sl, F t,
                                    T *kp, double *sg, double *sh, double *se) {
    *sg = *sh = *se = 0.0;
    for (i64 o = 0; o < L; o += CF_CHUNK) {
        A g, h, e;
        S(row_dot_act)(d + o, p + o, MIN(CF_CHUNK, L - o), m, s, b, act, sl, t, kp ? kp + o : NULL, &g, &h, &e);
        *sg += g;
        *sh += h;
        *se += e;
    }
}

/* one channel-first output row, o = act((p - m) * s + b), and one input-gradient row,
 * o = a dy' + bc (p - m) + k with dy' = dy act'((p - m) * s + b) (dy' = dy without act): shared
 * by the generic passes and the per-sample passes from cache; t: the row's threshold (TLU) */
static inline __attribute__((always_inline)) void S(affine_row)(const T *p, T *o, i64 L, F m, F s, F b, int act,
                                                                F sl, F t) {
#define AFF(_, v, K) (K ? S(act_fwd)(((v) - m) * s + b, K, sl, t) : ((v) - m) * s + b)
#define LOOP(K) ROW_OUT(o, p, p, L, AFF, K);
    if (act) {
        ACT_SWITCH(act, LOOP);
    } else {
        LOOP(0)
    }
#undef LOOP
#undef AFF
}

static inline __attribute__((always_inline)) void S(dx_row)(const T *d, const T *p, T *o, i64 L, F m, F a, F bc, F k,
                                                            F s, F b, int act, F sl, F t, const T *kp) {
    const T *dd = kp ? kp : d; /* dy' kept by the sums pass (kp may be o), or dy */
#define DX(dv, v, K) (K ? a * S(act_grad)(dv, ((v) - m) * s + b, K, sl, t) + bc * ((v) - m) + k                \
                        : a * (dv) + bc * ((v) - m) + k)
#define LOOP(K) ROW_OUT(o, dd, p, L, DX, K);
    if (act && !kp) {
        ACT_SWITCH(act, LOOP);
    } else {
        LOOP(0)
    }
#undef LOOP
#undef DX
}

/* sum dy' and sum dy' (p - m) of one channel-first row, dy' as in dx_row, and (*se) the
 * threshold's sum dy - dy' (0 without one); with kp, dy' is also stored there (dx_row then
 * reads it instead of evaluating the derivative again) */
static inline __attribute__((always_inline)) void S(sums_row)(const T *d, const T *p, i64 L, F m, F s, F b, int act,
                                                              F sl, F t, T *kp, double *sg, double *sh, double *se) {
    if (act) {
#define SUMS(K) S(row_sums_act)(d, p, L, m, s, b, K, sl, t, kp, sg, sh, se);
        ACT_SWITCH(act, SUMS);
#undef SUMS
    } else {
        S(row_sums)(d, p, L, m, sg, sh);
        *se = 0.0;
    }
}

/* the same three for one channels-last row of C channels, coefficients per channel (t: the
 * thresholds, read only for an activation that has them: THRESHOLD) */
static inline __attribute__((always_inline)) void S(affine_row_cl)(const T *p, T *o, i64 C, const F *m, const F *s,
                                                                   const F *b, int act, F sl, const F *t) {
    /* (the activation a literal through act_k: CL_ROW's map takes the channel, not the code) */
#define AFF(_, v, c) (act_k ? S(act_fwd)(((v) - m[c]) * s[c] + b[c], act_k, sl, THRESHOLD(act_k, t, c))        \
                            : ((v) - m[c]) * s[c] + b[c])
#define LOOP(K)                                                                                                \
    {                                                                                                          \
        const int act_k = K;                                                                                   \
        CL_ROW(o, p, p, C, AFF);                                                                               \
    }
    if (act) {
        ACT_SWITCH(act, LOOP);
    } else
        LOOP(0)
#undef LOOP
#undef AFF
}

static inline __attribute__((always_inline)) void S(dx_row_cl)(const T *d, const T *p, T *o, i64 C, const F *m,
                                                               const F *a, const F *bc, const F *k, const F *s,
                                                               const F *b, int act, F sl, const F *t, const T *kp) {
    const T *dd = kp ? kp : d; /* dy' kept by the sums pass (kp may be o), or dy */
#define DX(dv, v, c) (act_k ? a[c] * S(act_grad)(dv, ((v) - m[c]) * s[c] + b[c], act_k, sl, THRESHOLD(act_k, t, c)) \
                                  + bc[c] * ((v) - m[c]) + k[c]                                                \
                            : a[c] * (dv) + bc[c] * ((v) - m[c]) + k[c])
#define LOOP(K)                                                                                                \
    {                                                                                                          \
        const int act_k = K;                                                                                   \
        CL_ROW(o, dd, p, C, DX);                                                                               \
    }
    if (act && !kp) {
        ACT_SWITCH(act, LOOP);
    } else
        LOOP(0)
#undef LOOP
#undef DX
}

/* CALL computes values [i0_, i0_ + k_) of an output run of len values into o_: written in
 * place at dst when not streaming, else chunk by chunk into an L1 buffer streamed out to dst
 * (kernels.c: streams, stream_copy) */
#define STREAMED(st, dst, len, CALL)                                                                           \
    do {                                                                                                       \
        if (!(st)) {                                                                                           \
            const i64 i0_ = 0, k_ = (len);                                                                     \
            T *o_ = (dst);                                                                                     \
            CALL;                                                                                              \
        } else {                                                                                               \
            T o_[STREAM_CHUNK] __attribute__((aligned(64)));                                                   \
            for (i64 i0_ = 0; i0_ < (len); i0_ += STREAM_CHUNK) {                                              \
                const i64 k_ = MIN(STREAM_CHUNK, (len) - i0_);                                                 \
                CALL;                                                                                          \
                stream_copy((dst) + i0_, o_, k_ * (i64)sizeof(T));                                             \
            }                                                                                                  \
        }                                                                                                      \
    } while (0)

/* Rows [r0, r1) of C values of a channels-last output at dst, ROW(r, o, i0, k) writing channels
 * [i0, i0 + k) of row r to o: straight (one row at a time when not streaming), or streamed out
 * of an L1 buffer, several rows (that fit one chunk: ROWS_A_BLOCK) at a time or one by chunks. */
#define ROWS_A_BLOCK(st, C) ((st) && (C) <= STREAM_CHUNK ? STREAM_CHUNK / (C) : 1)
#define ROW_BLOCK(st, dst, r0, r1, C, ROW)                                                                     \
    do {                                                                                                       \
        if ((r1) - (r0) > 1) {                                                                                 \
            T buf_[STREAM_CHUNK] __attribute__((aligned(64)));                                                 \
            for (i64 r_ = (r0); r_ < (r1); r_++) ROW(r_, buf_ + (r_ - (r0)) * (C), 0, (C));                    \
            stream_copy((dst) + (r0) * (C), buf_, ((r1) - (r0)) * (C) * (i64)sizeof(T));                       \
        } else                                                                                                 \
            STREAMED(st, (dst) + (r0) * (C), (C), ROW((r0), o_, i0_, k_));                                     \
    } while (0)

/* ROW_BLOCK over rows [0, nrows) as the work-sharing loop of an enclosing parallel region */
#define ROWS_STREAMED(st, dst, nrows, C, ROW)                                                                  \
    do {                                                                                                       \
        const i64 rb_ = ROWS_A_BLOCK(st, C), nb_ = ((nrows) + rb_ - 1) / rb_;                                  \
        _Pragma("omp for schedule(static) nowait") for (i64 b_ = 0; b_ < nb_; b_++)                            \
            ROW_BLOCK(st, dst, b_ * rb_, MIN(b_ * rb_ + rb_, (nrows)), C, ROW);                                \
        stream_fence(st);                                                                                      \
    } while (0)

/* ---- channel-first (N, C, L): one (n, c) row at a time, its coefficients in registers ---- */

void S(nl_moments_cf)(const T *x, i64 N, i64 C, i64 L, double *mean, double *m2, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * C; r++) {
        double na;
        S(row_moments)(x + r * L, L, &na, &mean[r], &m2[r]);
    }
}

/* thr: the per-(n, c) thresholds of an activation that has them (THRESHOLDED: TLU), else unread */
int S(nl_affine_cf)(const T *x, T *y, i64 N, i64 C, i64 L, const double *center, const double *scale,
                    const double *shift, int act, double slope, const double *thr, int rowmask, int nt) {
    REPEAT_ROWS(4, &center, &scale, &shift, &thr);
    const int st = STREAMABLE && streams(N * C * L * (i64)sizeof(T));
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static) nowait
        for (i64 r = 0; r < N * C; r++)
            STREAMED(st, y + r * L, L,
                     S(affine_row)(x + r * L + i0_, o_, k_, (F)center[r], (F)scale[r], (F)shift[r], act, (F)slope,
                                   THRESHOLDED(act) ? (F)thr[r] : 0));
        stream_fence(st);
    }
    free(rep_);
    return 0;
}

/* keep: the input-gradient buffer, where dy' is kept for nl_dx_cf (kept = 1) when KEEPS(act); or NULL.
 * e: with a threshold, the per-(n, c) sum dy - dy' (the threshold's gradient) */
int S(nl_reduce_cf)(const T *dy, const T *x, i64 N, i64 C, i64 L, const double *center, double *g, double *h,
                    const double *scale, const double *shift, int act, double slope, const double *thr, double *e,
                    T *keep, int rowmask, int nt) {
    REPEAT_ROWS(4, &center, &scale, &shift, &thr);
    if (!KEEPS(act)) keep = NULL;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * C; r++) {
        double se;
        S(sums_row)(dy + r * L, x + r * L, L, (F)center[r], act ? (F)scale[r] : 0, act ? (F)shift[r] : 0, act,
                    (F)slope, THRESHOLDED(act) ? (F)thr[r] : 0, keep ? keep + r * L : NULL, &g[r], &h[r], &se);
        if (THRESHOLDED(act)) e[r] = se;
    }
    free(rep_);
    return 0;
}

int S(nl_dx_cf)(const T *dy, const T *x, T *dx, i64 N, i64 C, i64 L, const double *center, const double *a,
                const double *b, const double *k, const double *scale, const double *shift, int act, double slope,
                const double *thr, int kept, int rowmask, int nt) {
    REPEAT_ROWS(7, &center, &a, &b, &k, &scale, &shift, &thr);
    kept = kept && KEEPS(act);
    const int st = STREAMABLE && streams(N * C * L * (i64)sizeof(T));
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static) nowait
        for (i64 r = 0; r < N * C; r++)
            STREAMED(st, dx + r * L, L,
                     S(dx_row)(dy + r * L + i0_, x + r * L + i0_, o_, k_, (F)center[r], (F)a[r], (F)b[r], (F)k[r],
                               act ? (F)scale[r] : 0, act ? (F)shift[r] : 0, act, (F)slope,
                               THRESHOLDED(act) ? (F)thr[r] : 0, kept ? dx + r * L + i0_ : NULL));
        stream_fence(st);
    }
    free(rep_);
    return 0;
}

/* ---- channels-last (N, L, C): work items are (sample, block of rows); inside one, CB
 * channels at a time so that accumulators and coefficients stay in registers ---- */

/* moments of rows [0, k) of a block, channels [0, w) of a channel block */
static inline __attribute__((always_inline)) void S(block_moments)(const T *p0, i64 k, i64 C, i64 w, A *mu, A *e,
                                                                   A *q) {
    for (i64 c = 0; c < w; c++) mu[c] = e[c] = q[c] = 0;
    for (i64 l = 0; l < k; l++) {
        const T *p = p0 + l * C;
#pragma omp simd
        for (i64 c = 0; c < w; c++) mu[c] += LD(p[c]);
    }
    for (i64 c = 0; c < w; c++) mu[c] /= (A)k;
    for (i64 l = 0; l < k; l++) {
        const T *p = p0 + l * C;
#pragma omp simd
        for (i64 c = 0; c < w; c++) {
            A d = LD(p[c]) - mu[c];
            e[c] += d;
            q[c] += d * d;
        }
    }
}

#if PAIRED
/* The same for the 16-bit types (bfloat16, float16 without F16C), CB channels read as CB / 2
 * 32-bit words of two channels each:
 * a word's low half (channel 2j) converted by a shift, its high half (2j + 1) by a mask, no
 * shuffles (widening 16 values to 32 bits is a lane-crossing shuffle, which bounds these
 * loops). The sums of channel c are kept at PAIR_AT(c): even channels first, then odd ones;
 * each channel's sums run over the same rows in the same order, so the values are those of
 * the plain loop. */
#define PAIR_AT(c) (((c) & 1) * (CB / 2) + (c) / 2)
static inline __attribute__((always_inline)) void S(block_moments2)(const T *p0, i64 k, i64 C, A *mu, A *e, A *q) {
    const i64 H = CB / 2;
    for (i64 c = 0; c < CB; c++) mu[c] = e[c] = q[c] = 0;
    for (i64 l = 0; l < k; l++) {
        const nl_pair *p = (const nl_pair *)(p0 + l * C);
#pragma omp simd
        for (i64 j = 0; j < H; j++) {
            mu[j] += LD_LO(p[j]);
            mu[H + j] += LD_HI(p[j]);
        }
    }
    for (i64 c = 0; c < CB; c++) mu[c] /= (A)k;
    for (i64 l = 0; l < k; l++) {
        const nl_pair *p = (const nl_pair *)(p0 + l * C);
#pragma omp simd
        for (i64 j = 0; j < H; j++) {
            A d0 = LD_LO(p[j]) - mu[j], d1 = LD_HI(p[j]) - mu[H + j];
            e[j] += d0;
            q[j] += d0 * d0;
            e[H + j] += d1;
            q[H + j] += d1 * d1;
        }
    }
}
#endif

#if F16C_CHUNKS
/* float16 with F16C: block_moments and block_reduce of CB channels as CB / 8 vectors of eight
 * (channel c in lane c % 8 of vector c / 8), a row's read by one vcvtph2ps a vector; each
 * channel's sums over the same rows in the same order as the plain loops (measured: kernels.c's
 * unit 4) */
#define NB8 (CB / 8)
static inline __attribute__((always_inline)) void S(block_moments_v8)(const T *p0, i64 k, i64 C, A *mu, A *e, A *q) {
    nl_v8 m[NB8] = {0}, ae[NB8] = {0}, aq[NB8] = {0};
    for (i64 l = 0; l < k; l++)
#pragma GCC unroll 8
        for (int v = 0; v < NB8; v++) m[v] += V8(p0 + l * C + 8 * v);
    for (int v = 0; v < NB8; v++) m[v] /= (A)k;
    for (i64 l = 0; l < k; l++)
#pragma GCC unroll 8
        for (int v = 0; v < NB8; v++) {
            nl_v8 d = V8(p0 + l * C + 8 * v) - m[v];
            ae[v] += d;
            aq[v] += d * d;
        }
    memcpy(mu, m, sizeof m), memcpy(e, ae, sizeof ae), memcpy(q, aq, sizeof aq);
}

static inline __attribute__((always_inline)) void S(block_reduce_v8)(const T *d0, const T *p0, i64 k, i64 C,
                                                                     const A *m0, A *sg, A *sh) {
    nl_v8 m[NB8], g[NB8] = {0}, h[NB8] = {0};
    memcpy(m, m0, sizeof m);
    for (i64 l = 0; l < k; l++)
#pragma GCC unroll 8
        for (int v = 0; v < NB8; v++) {
            nl_v8 dv = V8(d0 + l * C + 8 * v);
            g[v] += dv;
            h[v] += dv * (V8(p0 + l * C + 8 * v) - m[v]);
        }
    memcpy(sg, g, sizeof g), memcpy(sh, h, sizeof h);
}
#undef NB8

/* block_reduce_act_ of CB channels: each row's CB values of dy and x converted first, dy' kept
 * as float and converted back the same way */
static inline __attribute__((always_inline)) void S(block_reduce_act_v8)(const T *d0, const T *p0, i64 k, i64 C,
                                                                         const A *m, const F *s, const F *b, int act,
                                                                         F sl, const F *t, T *kp, A *sg, A *sh,
                                                                         A *se) {
    for (i64 c = 0; c < CB; c++) sg[c] = sh[c] = se[c] = 0;
    for (i64 l = 0; l < k; l++) {
        float dv[CB], xv[CB], kv[CB];
        S(chunk_in)(dv, d0 + l * C, CB);
        S(chunk_in)(xv, p0 + l * C, CB);
#pragma omp simd
        for (i64 c = 0; c < CB; c++) {
            F xc = xv[c] - m[c], dd = S(act_grad)(dv[c], xc * s[c] + b[c], act, sl, THRESHOLD(act, t, c));
            kv[c] = dd;
            sg[c] += dd;
            sh[c] += dd * xc;
            if (THRESHOLDED(act)) se[c] += dv[c] - dd;
        }
        if (kp) S(chunk_out)(kp + l * C, kv, CB);
    }
}
#endif

/* a block's exact mean and M2 per channel, in double (q is about mu; the exact mean is
 * mu + e / k): the full-width call with a literal CB is the vectorised one */
static inline __attribute__((always_inline)) void S(block_moments_exact)(const T *p0, i64 k, i64 C, i64 w,
                                                                         double *pm, double *pq) {
    A mu[CB], e[CB], q[CB];
#if F16C_CHUNKS
    if (w == CB) {
        S(block_moments_v8)(p0, k, C, mu, e, q);
        for (i64 c = 0; c < w; c++) {
            pm[c] = (double)mu[c] + (double)e[c] / k;
            pq[c] = (double)q[c] - (double)e[c] * e[c] / k;
        }
        return;
    }
#elif PAIRED
    if (w == CB) { /* pairs of channels: channel c's sums at PAIR_AT(c) */
        S(block_moments2)(p0, k, C, mu, e, q);
        for (i64 c = 0; c < w; c++) {
            const i64 i = PAIR_AT(c);
            pm[c] = (double)mu[i] + (double)e[i] / k;
            pq[c] = (double)q[i] - (double)e[i] * e[i] / k;
        }
        return;
    }
#endif
    if (w == CB)
        S(block_moments)(p0, k, C, CB, mu, e, q);
    else
        S(block_moments)(p0, k, C, w, mu, e, q);
    for (i64 c = 0; c < w; c++) {
        pm[c] = (double)mu[c] + (double)e[c] / k;
        pq[c] = (double)q[c] - (double)e[c] * e[c] / k;
    }
}

static inline __attribute__((always_inline)) void S(block_reduce)(const T *d0, const T *p0, i64 k, i64 C, i64 w,
                                                                  const A *m, A *sg, A *sh) {
    for (i64 c = 0; c < w; c++) sg[c] = sh[c] = 0;
    for (i64 l = 0; l < k; l++) {
        const T *d = d0 + l * C, *p = p0 + l * C;
#pragma omp simd
        for (i64 c = 0; c < w; c++) {
            sg[c] += LD(d[c]);
            sh[c] += LD(d[c]) * (LD(p[c]) - m[c]);
        }
    }
}

static inline __attribute__((always_inline)) void S(block_reduce_act_)(const T *d0, const T *p0, i64 k, i64 C, i64 w,
                                                                       const A *m, const F *s, const F *b, int act, F sl,
                                                                       const F *t, T *kp, A *sg, A *sh, A *se) {
    for (i64 c = 0; c < w; c++) sg[c] = sh[c] = se[c] = 0;
    for (i64 l = 0; l < k; l++) {
        const T *d = d0 + l * C, *p = p0 + l * C;
        T *q = kp ? kp + l * C : NULL;
#pragma omp simd
        for (i64 c = 0; c < w; c++) {
            F dy = LD(d[c]), xc = LD(p[c]) - m[c], dd = S(act_grad)(dy, xc * s[c] + b[c], act, sl, THRESHOLD(act, t, c));
            if (q) q[c] = ST(dd);
            sg[c] += dd;
            sh[c] += dd * xc;
            if (THRESHOLDED(act)) se[c] += dy - dd;
        }
    }
}

/* (kp tested outside the loops, as in row_dot_act) */
static inline __attribute__((always_inline)) void S(block_reduce_act)(const T *d0, const T *p0, i64 k, i64 C, i64 w,
                                                                      const A *m, const F *s, const F *b, int act, F sl,
                                                                      const F *t, T *kp, A *sg, A *sh, A *se) {
    if (kp)
        S(block_reduce_act_)(d0, p0, k, C, w, m, s, b, act, sl, t, kp, sg, sh, se);
    else
        S(block_reduce_act_)(d0, p0, k, C, w, m, s, b, act, sl, t, NULL, sg, sh, se);
}

#if PAIRED
/* the two for CB channels of the 16-bit types as pairs (block_moments2): m, s, b, t and the
 * sums in the PAIR_AT layout */
static inline __attribute__((always_inline)) void S(block_reduce2)(const T *d0, const T *p0, i64 k, i64 C,
                                                                   const A *m, A *sg, A *sh) {
    const i64 H = CB / 2;
    for (i64 c = 0; c < CB; c++) sg[c] = sh[c] = 0;
    for (i64 l = 0; l < k; l++) {
        const nl_pair *d = (const nl_pair *)(d0 + l * C), *p = (const nl_pair *)(p0 + l * C);
#pragma omp simd
        for (i64 j = 0; j < H; j++) {
            sg[j] += LD_LO(d[j]);
            sh[j] += LD_LO(d[j]) * (LD_LO(p[j]) - m[j]);
            sg[H + j] += LD_HI(d[j]);
            sh[H + j] += LD_HI(d[j]) * (LD_HI(p[j]) - m[H + j]);
        }
    }
}

static inline __attribute__((always_inline)) void S(block_reduce_act2)(const T *d0, const T *p0, i64 k, i64 C,
                                                                       const A *m, const F *s, const F *b, int act,
                                                                       F sl, const F *t, T *kp, A *sg, A *sh, A *se) {
    const i64 H = CB / 2;
    for (i64 c = 0; c < CB; c++) sg[c] = sh[c] = se[c] = 0;
    for (i64 l = 0; l < k; l++) {
        const nl_pair *d = (const nl_pair *)(d0 + l * C), *p = (const nl_pair *)(p0 + l * C);
        nl_pair *q = kp ? (nl_pair *)(kp + l * C) : NULL;
#pragma omp simd
        for (i64 j = 0; j < H; j++) {
            F dy0 = LD_LO(d[j]), xc0 = LD_LO(p[j]) - m[j];
            F dd0 = S(act_grad)(dy0, xc0 * s[j] + b[j], act, sl, THRESHOLD(act, t, j));
            F dy1 = LD_HI(d[j]), xc1 = LD_HI(p[j]) - m[H + j];
            F dd1 = S(act_grad)(dy1, xc1 * s[H + j] + b[H + j], act, sl, THRESHOLD(act, t, H + j));
            if (q) q[j] = ST_PAIR(dd0, dd1);
            sg[j] += dd0;
            sh[j] += dd0 * xc0;
            if (THRESHOLDED(act)) se[j] += dy0 - dd0;
            sg[H + j] += dd1;
            sh[H + j] += dd1 * xc1;
            if (THRESHOLDED(act)) se[H + j] += dy1 - dd1;
        }
    }
}

/* src[0, CB) into dst in the PAIR_AT layout */
static inline __attribute__((always_inline)) void S(to_pairs)(F *dst, const F *src) {
    for (i64 j = 0; j < CB / 2; j++) {
        dst[j] = src[2 * j];
        dst[CB / 2 + j] = src[2 * j + 1];
    }
}

/* the same for n rows: src[q] into dst[q], q < n */
static inline __attribute__((always_inline)) void S(to_pairs_n)(F (*dst)[CB], const F *const *src, int n) {
    for (int q = 0; q < n; q++) S(to_pairs)(dst[q], src[q]);
}


/* block_sums of CB channels as pairs: its coefficients into the pair layout, the sums back */
static inline __attribute__((always_inline)) void S(block_sums2)(const T *d0, const T *p0, i64 k, i64 C,
                                                                 const A *m0, const F *s0, const F *b0, int act,
                                                                 F sl, const F *t0, T *kp, A *sg, A *sh, A *se) {
    A m[CB], g[CB], h[CB], e[CB];
    F s[CB], b[CB], t[CB];
    S(to_pairs)(m, m0);
    if (act) {
        S(to_pairs)(s, s0);
        S(to_pairs)(b, b0);
        if (THRESHOLDED(act)) S(to_pairs)(t, t0);
#define RED(K) S(block_reduce_act2)(d0, p0, k, C, m, s, b, K, sl, t, kp, g, h, e);
        ACT_SWITCH(act, RED);
#undef RED
    } else
        S(block_reduce2)(d0, p0, k, C, m, g, h);
    for (i64 c = 0; c < CB; c++) {
        sg[c] = g[PAIR_AT(c)];
        sh[c] = h[PAIR_AT(c)];
        se[c] = act ? e[PAIR_AT(c)] : 0;
    }
}
#endif

/* sums of rows [0, k) over channels [0, w) of a block, dy' = dy act'(...) with act, else dy
 * (se: the threshold's sum dy - dy', 0 without one); the full-width call with a literal CB is
 * the vectorised one */
static inline __attribute__((always_inline)) void S(block_sums)(const T *d0, const T *p0, i64 k, i64 C, i64 w,
                                                                const A *m, const F *s, const F *b, int act, F sl,
                                                                const F *t, T *kp, A *sg, A *sh, A *se) {
#if F16C_CHUNKS
    if (w == CB) {
        if (act) {
#define RED(K) S(block_reduce_act_v8)(d0, p0, k, C, m, s, b, K, sl, t, kp, sg, sh, se);
            ACT_SWITCH(act, RED);
#undef RED
        } else {
            S(block_reduce_v8)(d0, p0, k, C, m, sg, sh);
            for (i64 c = 0; c < CB; c++) se[c] = 0;
        }
        return;
    }
#endif
#if PAIRED
    if (w == CB) {
        S(block_sums2)(d0, p0, k, C, m, s, b, act, sl, t, kp, sg, sh, se);
        return;
    }
#endif
    if (act) {
#define RED(K)                                                                                                 \
    if (w == CB)                                                                                               \
        S(block_reduce_act)(d0, p0, k, C, CB, m, s, b, K, sl, t, kp, sg, sh, se);                              \
    else                                                                                                       \
        S(block_reduce_act)(d0, p0, k, C, w, m, s, b, K, sl, t, kp, sg, sh, se);
        ACT_SWITCH(act, RED);
#undef RED
    } else {
        if (w == CB)
            S(block_reduce)(d0, p0, k, C, CB, m, sg, sh);
        else
            S(block_reduce)(d0, p0, k, C, w, m, sg, sh);
        for (i64 c = 0; c < w; c++) se[c] = 0;
    }
}

/* merge per-(item, c) partial moments over the blocks of each sample, in block order, CB
 * channels of a sample per work item (vectorised over the channels: merge_row) */
static void S(merge_blocks)(const double *pm, const double *pq, i64 N, i64 L, i64 C, i64 R, i64 nb, double *mean,
                            double *m2, int nt) {
    i64 ncb = (C + CB - 1) / CB;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 it = 0; it < N * ncb; it++) {
        i64 n = it / ncb, c0 = (it % ncb) * CB, w = MIN(CB, C - c0);
        double na = 0.0, *ma = mean + n * C + c0, *qa = m2 + n * C + c0;
        for (i64 c = 0; c < w; c++) ma[c] = qa[c] = 0.0;
        for (i64 b = 0; b < nb; b++) {
            i64 at = (n * nb + b) * C + c0;
            merge_row(&na, ma, qa, w, (double)MIN(R, L - b * R), pm + at, pq + at);
        }
    }
}

int S(nl_moments_cl)(const T *x, i64 N, i64 L, i64 C, double *mean, double *m2, int nt) {
    i64 R = rows_per_block(C, sizeof(T)), nb = (L + R - 1) / R;
    double *pm = malloc(sizeof(double) * N * nb * C * 2);
    if (!pm) return 1;
    double *pq = pm + N * nb * C;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 it = 0; it < N * nb; it++) {
        i64 n = it / nb, l0 = (it % nb) * R, k = MIN(R, L - l0);
        for (i64 c0 = 0; c0 < C; c0 += CB)
            S(block_moments_exact)(x + (n * L + l0) * C + c0, k, C, MIN(CB, C - c0), pm + it * C + c0,
                                   pq + it * C + c0);
    }
    S(merge_blocks)(pm, pq, N, L, C, R, nb, mean, m2, nt);
    free(pm);
    return 0;
}

int S(nl_reduce_cl)(const T *dy, const T *x, i64 N, i64 L, i64 C, const double *center, double *g, double *h,
                    const double *scale, const double *shift, int act, double slope, const double *thr, double *e,
                    T *keep, int rowmask, int nt) {
    REPEAT_ROWS(4, &center, &scale, &shift, &thr);
    if (!KEEPS(act)) keep = NULL;
    const F sl = (F)slope;
    i64 R = rows_per_block(C, sizeof(T)), nb = (L + R - 1) / R;
    double *pg = malloc(sizeof(double) * N * nb * C * 3);
    if (!pg) {
        free(rep_);
        return 1;
    }
    double *ph = pg + N * nb * C, *pe = pg + 2 * N * nb * C;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 it = 0; it < N * nb; it++) {
        i64 n = it / nb, l0 = (it % nb) * R, k = MIN(R, L - l0);
        for (i64 c0 = 0; c0 < C; c0 += CB) {
            A m[CB], sg[CB], sh[CB], se[CB];
            i64 w = MIN(CB, C - c0), at = (n * L + l0) * C + c0;
            for (i64 c = 0; c < w; c++) m[c] = (A)center[n * C + c0 + c];
            F s[CB], b[CB], t[CB];
            for (i64 c = 0; c < w && act; c++) {
                s[c] = (F)scale[n * C + c0 + c];
                b[c] = (F)shift[n * C + c0 + c];
                t[c] = THRESHOLDED(act) ? (F)thr[n * C + c0 + c] : 0;
            }
            S(block_sums)(dy + at, x + at, k, C, w, m, s, b, act, sl, t, keep ? keep + at : NULL, sg, sh, se);
            for (i64 c = 0; c < w; c++) {
                pg[it * C + c0 + c] = sg[c];
                ph[it * C + c0 + c] = sh[c];
                pe[it * C + c0 + c] = se[c];
            }
        }
    }
    /* the blocks' sums in block order, CB channels of a sample per work item, vectorised */
    i64 ncb = (C + CB - 1) / CB;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 it = 0; it < N * ncb; it++) {
        i64 n = it / ncb, c0 = (it % ncb) * CB, w = MIN(CB, C - c0);
        double *gs = g + n * C + c0, *hs = h + n * C + c0, *es = THRESHOLDED(act) ? e + n * C + c0 : NULL;
        for (i64 c = 0; c < w; c++) {
            gs[c] = hs[c] = 0.0;
            if (es) es[c] = 0.0;
        }
        for (i64 b = 0; b < nb; b++) {
            i64 at = (n * nb + b) * C + c0;
#pragma omp simd
            for (i64 c = 0; c < w; c++) {
                gs[c] += pg[at + c];
                hs[c] += ph[at + c];
            }
            if (es)
#pragma omp simd
                for (i64 c = 0; c < w; c++) es[c] += pe[at + c];
        }
    }
    free(pg);
    free(rep_);
    return 0;
}

/* the elementwise passes go row by row over all C channels, with the sample's coefficients
 * as F rows (converted once): faster here than channel blocks. The `count` per-(n, c) arrays
 * (bit j of rowmask: src[j] is one (1, C) row for every sample, repeated here) as F rows, N * C
 * each, with `extra` more F allocated after them; NULL if out of memory */
static F *S(coef_rows)(const double *const *src, int count, i64 N, i64 C, int rowmask, i64 extra) {
    F *co = malloc(sizeof(F) * (N * C * count + extra));
    if (co)
        for (int j = 0; j < count; j++) {
            const i64 step = rowmask >> j & 1 ? 0 : C;
            for (i64 n = 0; n < N; n++)
                for (i64 c = 0; c < C; c++) co[(j * N + n) * C + c] = (F)src[j][n * step + c];
        }
    return co;
}

/* Rows [0, N L) of a channels-last (N, L, C) array, split over the threads of the enclosing
 * parallel region as schedule(static) would, each thread's range cut at sample boundaries and
 * into runs of at most RB rows: SEG(n, l0, k) handles rows [l0, l0 + k) of sample n, whose
 * per-(n, c) coefficients are fixed (no division per row) */
#define SAMPLE_RUNS(N, L, RB, SEG)                                                                             \
    do {                                                                                                       \
        const i64 nr_ = (N) * (L), tn_ = omp_get_num_threads(), ti_ = omp_get_thread_num();                    \
        const i64 q_ = nr_ / tn_, x_ = nr_ % tn_, r0_ = ti_ * q_ + MIN(ti_, x_), r1_ = r0_ + q_ + (ti_ < x_);  \
        for (i64 r_ = r0_; r_ < r1_;) {                                                                        \
            const i64 n_ = r_ / (L), l_ = r_ - n_ * (L), k_ = MIN(MIN(r1_ - r_, (L) - l_), (RB));              \
            SEG(n_, l_, k_);                                                                                   \
            r_ += k_;                                                                                          \
        }                                                                                                      \
    } while (0)

#if PAIRED_OUT
/* one row of CB channels of affine_row_cl and dx_row_cl for the 16-bit types, as pairs
 * (block_moments2), the coefficients in the PAIR_AT layout (kept: dy' was kept in o) */
static inline __attribute__((always_inline)) void S(affine_row2_cl)(const T *p0, T *o0, const F *m, const F *s,
                                                                    const F *b, int act, F sl, const F *t) {
    const i64 H = CB / 2;
    const nl_pair *p = (const nl_pair *)p0;
    nl_pair *o = (nl_pair *)o0;
#define AFF(v, i) (act ? S(act_fwd)(((v) - m[i]) * s[i] + b[i], act, sl, THRESHOLD(act, t, i)) : ((v) - m[i]) * s[i] + b[i])
#pragma omp simd
    for (i64 j = 0; j < H; j++) o[j] = ST_PAIR(AFF(LD_LO(p[j]), j), AFF(LD_HI(p[j]), H + j));
#undef AFF
}

static inline __attribute__((always_inline)) void S(dx_row2_cl)(const T *d0, const T *p0, T *o0, const F *m,
                                                                const F *a, const F *bc, const F *k, const F *s,
                                                                const F *b, int act, F sl, const F *t, int kept) {
    const i64 H = CB / 2;
    const nl_pair *d = (const nl_pair *)d0, *p = (const nl_pair *)p0;
    nl_pair *o = (nl_pair *)o0;
#define DX(dd, v, i) (a[i] * (dd) + bc[i] * ((v) - m[i]) + k[i])
#define DXA(dy, v, i) (a[i] * S(act_grad)(dy, ((v) - m[i]) * s[i] + b[i], act, sl, THRESHOLD(act, t, i)) + bc[i] * ((v) - m[i]) + k[i])
    if (kept) {
#pragma omp simd
        for (i64 j = 0; j < H; j++)
            o[j] = ST_PAIR(DX(LD_LO(o[j]), LD_LO(p[j]), j), DX(LD_HI(o[j]), LD_HI(p[j]), H + j));
    } else if (act) {
#pragma omp simd
        for (i64 j = 0; j < H; j++)
            o[j] = ST_PAIR(DXA(LD_LO(d[j]), LD_LO(p[j]), j), DXA(LD_HI(d[j]), LD_HI(p[j]), H + j));
    } else {
#pragma omp simd
        for (i64 j = 0; j < H; j++)
            o[j] = ST_PAIR(DX(LD_LO(d[j]), LD_LO(p[j]), j), DX(LD_HI(d[j]), LD_HI(p[j]), H + j));
    }
#undef DX
#undef DXA
}
#endif

/* rows [0, k) (stride C) of channels [0, w) of one sample; the coefficients copied into local
 * arrays once: with a literal w (CB) they stay in registers across the rows */
static inline __attribute__((always_inline)) void S(affine_rows_cl)(const T *p, T *o, i64 k, i64 C, i64 w,
                                                                    const F *m0, const F *s0, const F *b0, int act,
                                                                    F sl, const F *t0) {
    F m[CB], s[CB], b[CB], t[CB];
#if PAIRED_OUT
    if (w == CB) {
        S(to_pairs)(m, m0);
        S(to_pairs)(s, s0);
        S(to_pairs)(b, b0);
        if (THRESHOLDED(act)) S(to_pairs)(t, t0);
        for (i64 l = 0; l < k; l++) S(affine_row2_cl)(p + l * C, o + l * C, m, s, b, act, sl, t);
        return;
    }
#endif
    (void)m, (void)s, (void)b, (void)t;
    /* (the coefficients read where they are: copied into the arrays above, GCC 12 writes them 16
     * bytes at a time and the rows then read them 32 at a time, each read waiting for the two
     * writes to retire; with a wide C the runs are a few rows long and that wait was most of the
     * pass: (128, 49, 512) float32 forward of layer norm 2.5 ms, torch's 1.2) */
    for (i64 l = 0; l < k; l++) S(affine_row_cl)(p + l * C, o + l * C, w, m0, s0, b0, act, sl, t0);
}

/* For each block of CB channels [c0, c0 + w) of a row of C: BLOCK(W, K), defined by the caller, with
 * the width W a literal CB where the block is full and the activation code K a literal (0: none) */
#define FULL_OR_NOT(K)                                                                                         \
    if (w == CB)                                                                                               \
        BLOCK(CB, K);                                                                                          \
    else                                                                                                       \
        BLOCK(w, K);
#define CHANNEL_BLOCKS(C, act)                                                                                 \
    for (i64 c0 = 0; c0 < (C); c0 += CB) {                                                                     \
        const i64 w = MIN(CB, (C) - c0);                                                                       \
        if (act) {                                                                                             \
            ACT_SWITCH(act, FULL_OR_NOT);                                                                      \
        } else                                                                                                 \
            FULL_OR_NOT(0)                                                                                     \
    }

/* channels-last rows at least WIDE_ROW channels wide are gone over whole, row after row, by the
 * output passes that take `whole` (not in blocks of CB channels down a run of rows: a run is a few
 * rows of a wide row, and each block starts over, copying its coefficients). Measured (AVX2, 2
 * threads, caches flushed, whole rows over blocks): float32 affine and input gradient 0.74-0.84 at
 * (32, 784, 128) and (128, 49, 512), layer norm's per-sample backward 0.84; bfloat16, whose blocks
 * copy their coefficients in pair order (to_pairs), 0.73-0.85 in the passes from memory at (128, 49,
 * 512), (32, 3136, 64), (32, 196, 256), but 1.03-1.10 in the per-sample passes from cache (group and
 * layer norm at (32, 3136, 64)): so bfloat16 took whole rows from memory only, and with AVX-512 (no
 * such host to measure on this time) not at all. With its rows in chunks of eight (CHUNK_IN, AVX2)
 * the per-sample passes from cache take whole rows too: group and layer norm 0.89-0.97 at (128, 49,
 * 512) and (32, 784, 256) (forward 0.94-1.00, backward 0.89-0.96), 0.88-1.19 at (32, 3136, 64) over
 * three runs on a loaded host (backward 0.88-1.01, forward 0.96-1.19). */
#define WIDE_ROW 64
#if !PAIRED_OUT || !defined(__AVX512F__)
#define WHOLE_FROM_MEMORY 1
#else
#define WHOLE_FROM_MEMORY 0
#endif
#if !PAIRED_OUT || defined(CHUNK_IN)
#define WHOLE_FROM_CACHE 1
#else
#define WHOLE_FROM_CACHE 0
#endif

/* rows [0, k) of C channels at p of nl_affine_cl into o, CB channels at a time, the coefficients
 * m, s, b (t: the thresholds, with one) of those channels held */
static inline __attribute__((always_inline)) void S(affine_run_cl)(const T *p, T *o, i64 k, i64 C, const F *m,
                                                                   const F *s, const F *b, int act, F sl,
                                                                   const F *t, int whole) {
    if (whole && C >= WIDE_ROW) { /* wide rows whole, one after the other (the coefficients read in place) */
        for (i64 l = 0; l < k; l++) S(affine_row_cl)(p + l * C, o + l * C, C, m, s, b, act, sl, t);
        return;
    }
#define BLOCK(W, K) S(affine_rows_cl)(p + c0, o + c0, k, C, W, m + c0, s + c0, b + c0, K, sl, THRESHOLDED(K) ? t + c0 : NULL)
    CHANNEL_BLOCKS(C, act);
#undef BLOCK
}

int S(nl_affine_cl)(const T *x, T *y, i64 N, i64 L, i64 C, const double *center, const double *scale,
                    const double *shift, int act, double slope, const double *thr, int rowmask, int nt) {
    const double *src[4] = {center, scale, shift, thr};
    F *co = S(coef_rows)(src, THRESHOLDED(act) ? 4 : 3, N, C, rowmask, 0);
    if (!co) return 1;
    const int st = STREAMABLE && streams(N * L * C * (i64)sizeof(T));
    const F sl = (F)slope;
    if (!st) {
        const i64 R = RUN_ROWS(C);
#define SEG(n, l0, k)                                                                                          \
    S(affine_run_cl)(x + ((n) * L + (l0)) * C, y + ((n) * L + (l0)) * C, k, C, co + (n) * C, co + (N + (n)) * C,   \
                     co + (2 * N + (n)) * C, act, sl, THRESHOLDED(act) ? co + (3 * N + (n)) * C : NULL, WHOLE_FROM_MEMORY)
#pragma omp parallel num_threads(nt)
        SAMPLE_RUNS(N, L, R, SEG);
#undef SEG
        free(co);
        return 0;
    }
#define ROW(r, o, i0, k)                                                                                       \
    {                                                                                                          \
        const F *cn = co + (r) / L * C + (i0);                                                                 \
        S(affine_row_cl)(x + (r) * C + (i0), o, k, cn, cn + N * C, cn + 2 * N * C, act, sl,                    \
                         THRESHOLDED(act) ? cn + 3 * N * C : NULL);                                            \
    }
#pragma omp parallel num_threads(nt)
    ROWS_STREAMED(st, y, N * L, C, ROW);
#undef ROW
    free(co);
    return 0;
}

/* the same for nl_dx_cl (kp: where dy' was kept, the output itself, or NULL) */
static inline __attribute__((always_inline)) void S(dx_rows_cl)(const T *d, const T *p, T *o, i64 k, i64 C, i64 w,
                                                                const F *m0, const F *a0, const F *bc0, const F *k0,
                                                                const F *s0, const F *b0, int act, F sl,
                                                                const F *t0, int kept) {
    F m[CB], a[CB], bc[CB], kc[CB], s[CB], b[CB], t[CB];
#if PAIRED_OUT
    if (w == CB) {
        S(to_pairs)(m, m0);
        S(to_pairs)(a, a0);
        S(to_pairs)(bc, bc0);
        S(to_pairs)(kc, k0);
        if (act) {
            S(to_pairs)(s, s0);
            S(to_pairs)(b, b0);
        }
        if (THRESHOLDED(act)) S(to_pairs)(t, t0);
        for (i64 l = 0; l < k; l++)
            S(dx_row2_cl)(d + l * C, p + l * C, o + l * C, m, a, bc, kc, s, b, act, sl, t, kept);
        return;
    }
#endif
    (void)m, (void)a, (void)bc, (void)kc, (void)s, (void)b, (void)t;
    for (i64 l = 0; l < k; l++) /* (coefficients read in place: affine_rows_cl says why) */
        S(dx_row_cl)(d + l * C, p + l * C, o + l * C, w, m0, a0, bc0, k0, s0, b0, act, sl, t0, kept ? o + l * C : NULL);
}

/* the same for nl_dx_cl */
static inline __attribute__((always_inline)) void S(dx_run_cl)(const T *d, const T *p, T *o, i64 k, i64 C,
                                                               const F *m, const F *a, const F *bc, const F *kc,
                                                               const F *s, const F *b, int act, F sl, const F *t,
                                                               int kept, int whole) {
    if (whole && C >= WIDE_ROW) {
        for (i64 l = 0; l < k; l++)
            S(dx_row_cl)(d + l * C, p + l * C, o + l * C, C, m, a, bc, kc, s, b, act, sl, t, kept ? o + l * C : NULL);
        return;
    }
#define BLOCK(W, K)                                                                                            \
    S(dx_rows_cl)(d + c0, p + c0, o + c0, k, C, W, m + c0, a + c0, bc + c0, kc + c0, K ? s + c0 : NULL,        \
                  K ? b + c0 : NULL, K, sl, THRESHOLDED(K) ? t + c0 : NULL, kept)
    CHANNEL_BLOCKS(C, act);
#undef BLOCK
}

int S(nl_dx_cl)(const T *dy, const T *x, T *dx, i64 N, i64 L, i64 C, const double *center, const double *a,
                const double *b, const double *k, const double *scale, const double *shift, int act, double slope,
                const double *thr, int kept, int rowmask, int nt) {
    kept = kept && KEEPS(act);
    const double *src[7] = {center, a, b, k, scale, shift, thr};
    const int nco = THRESHOLDED(act) ? 7 : act ? 6 : 4;
    F *co = S(coef_rows)(src, nco, N, C, rowmask, 0);
    if (!co) return 1;
    const int st = STREAMABLE && streams(N * L * C * (i64)sizeof(T));
    const F sl = (F)slope;
    if (!st) {
        const i64 R = RUN_ROWS(C);
#define AT(j, n) (j < nco ? co + (j * N + (n)) * C : NULL)
#define SEG(n, l0, k)                                                                                          \
    S(dx_run_cl)(dy + ((n) * L + (l0)) * C, x + ((n) * L + (l0)) * C, dx + ((n) * L + (l0)) * C, k, C, AT(0, n), \
                 AT(1, n), AT(2, n), AT(3, n), AT(4, n), AT(5, n), act, sl, AT(6, n), kept, WHOLE_FROM_MEMORY)
#pragma omp parallel num_threads(nt)
        SAMPLE_RUNS(N, L, R, SEG);
#undef SEG
#undef AT
        free(co);
        return 0;
    }
#define AT(j, n, i0) (j < nco ? co + (j * N + (n)) * C + (i0) : NULL)
#define ROW(r, o, i0, k)                                                                                       \
    {                                                                                                          \
        const i64 n = (r) / L;                                                                                 \
        S(dx_row_cl)(dy + (r) * C + (i0), x + (r) * C + (i0), o, k, AT(0, n, i0), AT(1, n, i0), AT(2, n, i0),  \
                     AT(3, n, i0), AT(4, n, i0), AT(5, n, i0), act, sl, AT(6, n, i0),                          \
                     kept ? dx + (r) * C + (i0) : NULL);                                                       \
    }
#pragma omp parallel num_threads(nt)
    ROWS_STREAMED(st, dx, N * L, C, ROW);
#undef ROW
#undef AT
    free(co);
    return 0;
}

/* one channels-last sample's per-channel moments (L rows of C) block by block, merged in double:
 * mean into ma, M2 into qa (pm, pq: C doubles of scratch each); returns every channel's count */
static double S(sample_moments_cl)(const T *xs, i64 L, i64 C, double *pm, double *pq, double *ma, double *qa) {
    i64 R = rows_per_block(C, sizeof(T));
    double cnt = 0.0;
    for (i64 c = 0; c < C; c++) ma[c] = qa[c] = 0.0;
    for (i64 l0 = 0; l0 < L; l0 += R) {
        i64 k = MIN(R, L - l0);
        for (i64 c0 = 0; c0 < C; c0 += CB)
            S(block_moments_exact)(xs + l0 * C + c0, k, C, MIN(CB, C - c0), pm + c0, pq + c0);
        merge_row(&cnt, ma, qa, C, (double)k, pm, pq);
    }
    return cnt;
}

/* ---- per-sample norms (group, instance, layer, RMS norm) in one forward pass from cache:
 * one sample per work item: its moments block by block (two-pass in L1, merged in double),
 * its groups' coefficients, then its output while the sample is still in L2. With center,
 * y = (x - group mean) * weight * rstd + bias; without (RMS), rstd comes from the mean
 * square and nothing is subtracted. Per-(n, c) mean and M2 are returned for the backward and
 * running statistics. Parallel over samples: the caller uses it when N is at least twice the
 * thread count. ---- */
int S(nl_group_fwd_cl)(const T *x, T *y, i64 N, i64 L, i64 C, i64 G, double eps, int center, const double *weight,
                       const double *bias, int act, double slope, const double *thr, double *mean, double *m2,
                       double *ctr, double *rstd_out, int nt) {
    i64 cpg = C / G;
    int failed = 0;
    const int st = STREAMABLE && streams(N * L * C * (i64)sizeof(T));
    const i64 rb = ROWS_A_BLOCK(st, C);
#pragma omp parallel num_threads(nt)
    {
        /* per channel: a block's mean and M2, the sample's so far */
        double *pm = malloc(sizeof(double) * C * 4), *pq = pm + C, *ma = pm + 2 * C, *qa = pm + 3 * C;
        F *cm = malloc(sizeof(F) * C * 4), *cs = cm + C, *cb = cm + 2 * C, *ct = cm + 3 * C;
        if (!pm || !cm) failed = 1;
#pragma omp for schedule(static)
        for (i64 n = 0; n < N; n++) {
            if (!pm || !cm) continue;
            const T *xs = x + n * L * C;
            T *ys = y + n * L * C;
            /* one group without per-channel moments wanted: the sample's L C contiguous values as one row */
            const int whole = G == 1 && !mean;
            double cnt = whole ? 0.0 : S(sample_moments_cl)(xs, L, C, pm, pq, ma, qa); /* every channel's count */
            for (i64 g = 0; g < G; g++) { /* the group's moments, then its coefficients */
                double gn = 0.0, gm = 0.0, gq = 0.0, ms = 0.0;
                if (whole) {
                    S(row_moments)(xs, L * C, &gn, &gm, &gq);
                    ms = gq + gn * gm * gm;
                } else
                    for (i64 c = g * cpg; c < (g + 1) * cpg; c++) {
                        merge(&gn, &gm, &gq, cnt, ma[c], qa[c]);
                        ms += qa[c] + cnt * ma[c] * ma[c];
                    }
                double rstd = center ? 1.0 / sqrt(gq / gn + eps) : 1.0 / sqrt(ms / gn + eps);
                for (i64 c = g * cpg; c < (g + 1) * cpg; c++) {
                    ctr[n * C + c] = center ? gm : 0.0;
                    rstd_out[n * C + c] = rstd;
                    cm[c] = center ? (F)gm : (F)0;
                    cs[c] = (F)(weight ? weight[c] * rstd : rstd);
                    cb[c] = (F)(bias ? bias[c] : 0.0);
                    ct[c] = THRESHOLDED(act) ? (F)thr[n * C + c] : 0;
                }
            }
            for (i64 c = 0; mean && c < C; c++) {
                mean[n * C + c] = ma[c];
                m2[n * C + c] = qa[c];
            }
#define ROW(l, o, i0, k)                                                                                       \
    S(affine_row_cl)(xs + (l) * C + (i0), o, k, cm + (i0), cs + (i0), cb + (i0), act, (F)slope, ct + (i0))
            if (!st) /* runs of rows, coefficients held */
                for (i64 l0 = 0; l0 < L; l0 += RUN_ROWS(C))
                    S(affine_run_cl)(xs + l0 * C, ys + l0 * C, MIN(RUN_ROWS(C), L - l0), C, cm, cs, cb, act, (F)slope,
                                     ct, WHOLE_FROM_CACHE);
            else
                for (i64 l0 = 0; l0 < L; l0 += rb)
                    ROW_BLOCK(st, ys, l0, MIN(l0 + rb, L), C, ROW);
#undef ROW
        }
        stream_fence(st);
        free(pm);
        free(cm);
    }
    return failed;
}

/* Channel-first version: work items are (sample, group) blocks of C/G * L contiguous values
 * (a group's channels are consecutive), small enough to stay in cache between the moments
 * and the output. */
int S(nl_group_fwd_cf)(const T *x, T *y, i64 N, i64 C, i64 L, i64 G, double eps, int center, const double *weight,
                       const double *bias, int act, double slope, const double *thr, double *mean, double *m2,
                       double *ctr, double *rstd_out, int nt) {
    i64 cpg = C / G;
    const int st = STREAMABLE && streams(N * C * L * (i64)sizeof(T));
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static) nowait
        for (i64 it = 0; it < N * G; it++) {
            i64 n = it / G, g = it % G;
            double gn = 0.0, gm = 0.0, gq = 0.0, ms = 0.0;
            if (mean)
                for (i64 c = g * cpg; c < (g + 1) * cpg; c++) { /* per-channel moments, merged */
                    double na, ma, qa;
                    S(row_moments)(x + (n * C + c) * L, L, &na, &ma, &qa);
                    mean[n * C + c] = ma;
                    m2[n * C + c] = qa;
                    merge(&gn, &gm, &gq, na, ma, qa);
                    ms += qa + na * ma * ma;
                }
            else { /* the group's cpg L contiguous values as one row */
                S(row_moments)(x + (n * C + g * cpg) * L, cpg * L, &gn, &gm, &gq);
                ms = gq + gn * gm * gm;
            }
            double rstd = center ? 1.0 / sqrt(gq / gn + eps) : 1.0 / sqrt(ms / gn + eps);
            const F m = center ? (F)gm : (F)0;
            for (i64 c = g * cpg; c < (g + 1) * cpg; c++) {
                ctr[n * C + c] = center ? gm : 0.0;
                rstd_out[n * C + c] = rstd;
            }
            for (i64 c = g * cpg; c < (g + 1) * cpg; c++) /* the output, from cache */
                STREAMED(st, y + (n * C + c) * L, L,
                         S(affine_row)(x + (n * C + c) * L + i0_, o_, k_, m, (F)(weight ? weight[c] * rstd : rstd),
                                       (F)(bias ? bias[c] : 0.0), act, (F)slope,
                                       THRESHOLDED(act) ? (F)thr[n * C + c] : 0));
        }
        stream_fence(st);
    }
    return 0;
}

/* Backward of the per-sample norms, channel-first, per (sample, group) block from cache:
 * g_c = sum dy, h_c = sum dy (x - mu); A = sum_c w_c g_c, B = sum_c w_c h_c over the group;
 * dx = w_c rstd dy - rstd^3 B / K (x - mu) - rstd A / K (RMS: mu = 0, no A term). The
 * per-(n, c) g and h are returned for the weight and bias gradients (and e, the threshold's
 * sum dy - dy', with one). ctr and rstd are the per-(n, c) group centre and 1/std from the
 * forward. */
int S(nl_group_bwd_cf)(const T *dy, const T *x, T *dx, i64 N, i64 C, i64 L, i64 G, int center, const double *weight,
                       const double *bias, int act, double slope, const double *thr, const double *ctr,
                       const double *rstd, double *g, double *h, double *e, int nt) {
    i64 cpg = C / G;
    double K = (double)(cpg * L);
    const int st = STREAMABLE && streams(N * C * L * (i64)sizeof(T));
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static) nowait
        for (i64 it = 0; it < N * G; it++) {
            i64 n = it / G, gi = it % G;
            double big_a = 0.0, big_b = 0.0;
            const F m = (F)ctr[n * C + gi * cpg];
            const double r = rstd[n * C + gi * cpg];
            for (i64 c = gi * cpg; c < (gi + 1) * cpg; c++) {
                double sg, sh, se;
                S(sums_row)(dy + (n * C + c) * L, x + (n * C + c) * L, L, m, (F)((weight ? weight[c] : 1.0) * r),
                            (F)(bias ? bias[c] : 0.0), act, (F)slope, THRESHOLDED(act) ? (F)thr[n * C + c] : 0,
                            KEEPS(act) ? dx + (n * C + c) * L : NULL, &sg, &sh, &se);
                g[n * C + c] = sg;
                h[n * C + c] = sh;
                if (THRESHOLDED(act)) e[n * C + c] = se;
                double w = weight ? weight[c] : 1.0;
                big_a += w * sg;
                big_b += w * sh;
            }
            const F bcoef = (F)(-r * r * r * big_b / K), kcoef = (F)(center ? -r * big_a / K : 0.0);
            for (i64 c = gi * cpg; c < (gi + 1) * cpg; c++) {
                const F a = (F)((weight ? weight[c] : 1.0) * r);
                const i64 at = (n * C + c) * L;
                STREAMED(st, dx + at, L,
                         S(dx_row)(dy + at + i0_, x + at + i0_, o_, k_, m, a, bcoef, kcoef, a,
                                   (F)(bias ? bias[c] : 0.0), act, (F)slope, THRESHOLDED(act) ? (F)thr[n * C + c] : 0,
                                   KEEPS(act) ? dx + at + i0_ : NULL));
            }
        }
        stream_fence(st);
    }
    return 0;
}

/* Batch norm (and mean-only batch norm) channel-first, one channel per work item: its N rows'
 * moments merged into the channel's, then its output rows while they are in cache (the generic
 * passes read x twice from memory: once for all moments, once for the output). mean and m2 get
 * the channel's moments (the running statistics' update reads them). */
int S(nl_batch_fwd_cf)(const T *x, T *y, i64 N, i64 C, i64 L, double eps, int mean_only, const double *weight,
                       const double *bias, int act, double slope, double *mean, double *m2, int nt) {
    const int st = STREAMABLE && streams(N * C * L * (i64)sizeof(T));
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static) nowait
        for (i64 c = 0; c < C; c++) {
            double cn = 0.0, cm = 0.0, cq = 0.0;
            for (i64 n = 0; n < N; n++) {
                double na, ma, qa;
                S(row_moments)(x + (n * C + c) * L, L, &na, &ma, &qa);
                merge(&cn, &cm, &cq, na, ma, qa);
            }
            mean[c] = cm;
            m2[c] = cq;
            const double rstd = mean_only ? 1.0 : 1.0 / sqrt(cq / cn + eps);
            const F s = (F)(weight ? weight[c] * rstd : rstd), b = (F)(bias ? bias[c] : 0.0);
            for (i64 n = 0; n < N; n++)
                STREAMED(st, y + (n * C + c) * L, L,
                         S(affine_row)(x + (n * C + c) * L + i0_, o_, k_, (F)cm, s, b, act, (F)slope, 0));
        }
        stream_fence(st);
    }
    return 0;
}

/* Its backward, one channel per work item from cache: G = sum dy', H = sum dy' (x - mu) over the
 * channel's N rows (returned, for the weight and bias gradients), then with a = w rstd, K = N L:
 * dx = a dy' - a rstd^2 H / K (x - mu) - a G / K (BatchStats.input_grad; mean-only: no H term) */
int S(nl_batch_bwd_cf)(const T *dy, const T *x, T *dx, i64 N, i64 C, i64 L, const double *mean, const double *rstd,
                       int mean_only, const double *weight, const double *bias, int act, double slope, double *g,
                       double *h, int nt) {
    const double K = (double)(N * L);
    const int st = STREAMABLE && streams(N * C * L * (i64)sizeof(T));
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static) nowait
        for (i64 c = 0; c < C; c++) {
            const double r = rstd[c], a = (weight ? weight[c] : 1.0) * r;
            const F m = (F)mean[c], b = (F)(bias ? bias[c] : 0.0);
            double sg = 0.0, sh = 0.0;
            for (i64 n = 0; n < N; n++) {
                double rg, rh, re;
                const i64 at = (n * C + c) * L;
                S(sums_row)(dy + at, x + at, L, m, (F)a, b, act, (F)slope, 0, KEEPS(act) ? dx + at : NULL, &rg, &rh,
                            &re);
                sg += rg;
                sh += rh;
            }
            g[c] = sg;
            h[c] = sh;
            const F bcoef = (F)(mean_only ? 0.0 : -a * r * r * sh / K), kcoef = (F)(-a * sg / K);
            for (i64 n = 0; n < N; n++) {
                const i64 at = (n * C + c) * L;
                STREAMED(st, dx + at, L,
                         S(dx_row)(dy + at + i0_, x + at + i0_, o_, k_, m, (F)a, bcoef, kcoef, (F)a, b, act, (F)slope, 0,
                                   KEEPS(act) ? dx + at + i0_ : NULL));
            }
        }
        stream_fence(st);
    }
    return 0;
}

/* The same, channels-last, one sample per work item (callers use it when N is at least twice
 * the thread count). */
int S(nl_group_bwd_cl)(const T *dy, const T *x, T *dx, i64 N, i64 L, i64 C, i64 G, int center, const double *weight,
                       const double *bias, int act, double slope, const double *thr, const double *ctr,
                       const double *rstd, double *g, double *h, double *e, int nt) {
    i64 cpg = C / G, R = rows_per_block(C, sizeof(T));
    double K = (double)(cpg * L);
    int failed = 0;
    const int st = STREAMABLE && streams(N * L * C * (i64)sizeof(T));
    const i64 rb = ROWS_A_BLOCK(st, C);
#pragma omp parallel num_threads(nt)
    {
        /* per channel: a = w rstd (also the epilogue's scale), centre, b, k, the epilogue's shift
         * and threshold */
        F *ca = malloc(sizeof(F) * C * 6), *cm = ca + C, *cb = ca + 2 * C, *ck = ca + 3 * C, *csh = ca + 4 * C,
          *ct = ca + 5 * C;
        double *ab = malloc(sizeof(double) * G * 2);
        /* wider than one channel block: a row block's sums over all C channels at once, row by row
         * (the reads in order; block by block they jump a row's length every CB channels: layer
         * norm (128, 49, 512) float32 backward 4.3 -> see the commit) */
#if F16C_CHUNKS
        const int wide = 0; /* (float16 with F16C: its blocks are the converted ones, block_sums) */
#else
        const int wide = C > CB;
#endif
        A *wg = wide ? malloc(sizeof(A) * C * 3) : NULL, *wh = wg ? wg + C : NULL, *we = wg ? wg + 2 * C : NULL;
        if (!ca || !ab || (wide && !wg)) failed = 1;
#pragma omp for schedule(static)
        for (i64 n = 0; n < N; n++) {
            if (!ca || !ab || (wide && !wg)) continue;
            const T *ds = dy + n * L * C, *xs = x + n * L * C;
            T *os = dx + n * L * C;
            double *gs = g + n * C, *hs = h + n * C, *es = THRESHOLDED(act) ? e + n * C : NULL;
            for (i64 c = 0; c < C; c++) {
                gs[c] = hs[c] = 0.0;
                if (es) es[c] = 0.0;
                cm[c] = (F)ctr[n * C + c];
                ca[c] = (F)((weight ? weight[c] : 1.0) * rstd[n * C + c]);
                csh[c] = (F)(bias ? bias[c] : 0.0);
                ct[c] = THRESHOLDED(act) ? (F)thr[n * C + c] : 0;
            }
            for (i64 l0 = 0; l0 < L; l0 += R) {
                i64 k = MIN(R, L - l0);
                if (wide) {
                    const i64 at = l0 * C;
                    S(block_sums)(ds + at, xs + at, k, C, C, cm, ca, csh, act, (F)slope, ct, KEEPS(act) ? os + at : NULL,
                                  wg, wh, we);
                    for (i64 c = 0; c < C; c++) {
                        gs[c] += wg[c];
                        hs[c] += wh[c];
                        if (es) es[c] += we[c];
                    }
                    continue;
                }
                for (i64 c0 = 0; c0 < C; c0 += CB) {
                    A m[CB], sg[CB], sh[CB], se[CB];
                    i64 w = MIN(CB, C - c0), at = l0 * C + c0;
                    for (i64 c = 0; c < w; c++) m[c] = cm[c0 + c];
                    S(block_sums)(ds + at, xs + at, k, C, w, m, ca + c0, csh + c0, act, (F)slope, ct + c0,
                                  KEEPS(act) ? os + at : NULL, sg, sh, se);
                    for (i64 c = 0; c < w; c++) {
                        gs[c0 + c] += sg[c];
                        hs[c0 + c] += sh[c];
                        if (es) es[c0 + c] += se[c];
                    }
                }
            }
            for (i64 gi = 0; gi < G; gi++) ab[gi] = ab[G + gi] = 0.0;
            for (i64 c = 0; c < C; c++) {
                double w = weight ? weight[c] : 1.0;
                ab[c / cpg] += w * gs[c];
                ab[G + c / cpg] += w * hs[c];
            }
            for (i64 c = 0; c < C; c++) {
                double r = rstd[n * C + c];
                cb[c] = (F)(-r * r * r * ab[G + c / cpg] / K);
                ck[c] = (F)(center ? -r * ab[c / cpg] / K : 0.0);
            }
#define ROW(l, o, i0, k)                                                                                       \
    S(dx_row_cl)(ds + (l) * C + (i0), xs + (l) * C + (i0), o, k, cm + (i0), ca + (i0), cb + (i0), ck + (i0),   \
                 ca + (i0), csh + (i0), act, (F)slope, ct + (i0), KEEPS(act) ? os + (l) * C + (i0) : NULL)
            if (!st)
                for (i64 l0 = 0; l0 < L; l0 += RUN_ROWS(C))
                    S(dx_run_cl)(ds + l0 * C, xs + l0 * C, os + l0 * C, MIN(RUN_ROWS(C), L - l0), C, cm, ca, cb, ck, ca,
                                 csh, act, (F)slope, ct, KEEPS(act), WHOLE_FROM_CACHE);
            else
                for (i64 l0 = 0; l0 < L; l0 += rb)
                    ROW_BLOCK(st, os, l0, MIN(l0 + rb, L), C, ROW);
#undef ROW
        }
        stream_fence(st);
        free(ca);
        free(ab);
        free(wg);
    }
    return failed;
}

/* ---- Layer norm and RMS norm over the channel axis alone (the transformer's LayerNorm and
 * RMSNorm): the rows of an (M, C) matrix, one row per position. Per row, with m the row's mean
 * (center) or 0 (RMS) and rstd = 1 / sqrt(mean((x - m)^2) + eps):
 *
 *   y  = (x - m) rstd w + b
 *   dx = rstd w dy - rstd A1 / C - (x - m) rstd^3 A2 / C,   A1 = sum w dy (center; RMS: 0),
 *                                                            A2 = sum w dy (x - m)
 *   dw = sum over rows of dy (x - m) rstd,  db = sum over rows of dy
 *
 * Each row is read from memory once a pass; its sums (two-pass: the mean, then the squared
 * deviations) and its output are made while it is in L1. The forward goes over blocks of up to
 * ROWS_BLOCK rows (ROWS_BLOCK_BYTES of input), each step over every row of the block before the
 * next step, so that the rows' dependency chains (two sums across the vector, the square root)
 * overlap instead of following each other. Measured two threads from memory, RMS norm forward
 * over the row-at-a-time kernel before it (two runs): bfloat16 0.56-0.58x at C = 64, 0.77-0.78x
 * at 256, 0.90x at 768; float32 0.64-0.99x, 0.83-0.97x, 1.02-1.23x (blocks of 4 kB were slower at
 * 256 and 768). The backward (one sum pass and one output pass a row) goes row by row and adds
 * the weight's and bias's gradients in its sum pass: over the kernel before it 0.86-0.96x in
 * bfloat16, 0.70-0.97x in float32 (blocked, it was 1.0-1.35x). The weight and bias come in the
 * compute type F (float32, float64 for double), as a layer holds them; bfloat16 reads and writes
 * rows as 32-bit words of two values, with the weight, bias and their gradients' sums split into
 * even and odd channels to match. ---- */
#define ROWS_BLOCK 8
#define ROWS_BLOCK_BYTES 1024
/* where channel c of a row of C sits in the rows' channel order: bfloat16 rows of even C go as
 * words of two values, so their per-channel factors and sums are held even channels first */
#if PAIRED_OUT
#define ROWS_AT(c, C) ((C) & 1 ? (c) : (c) & 1 ? (C) / 2 + (c) / 2 : (c) / 2)
#else
#define ROWS_AT(c, C) (c)
#endif

/* sum of x (sq = 0) or of (x - m)^2 (sq = 1) over a row of k <= CF_CHUNK values, in A */
static inline __attribute__((always_inline)) A S(rows_sum)(const T *p, i64 k, F m, int sq) {
    A s = 0;
#if PAIRED
    const nl_pair *pw = (const nl_pair *)p;
#pragma omp simd reduction(+ : s)
    for (i64 j = 0; j < k / 2; j++) {
        F a = LD_LO(pw[j]) - m, b = LD_HI(pw[j]) - m;
        s += sq ? a * a + b * b : a + b;
    }
    if (k & 1) s += sq ? (LD(p[k - 1]) - m) * (LD(p[k - 1]) - m) : LD(p[k - 1]) - m;
#else
    i64 i = 0;
#if F16C_CHUNKS /* (float16: eight values a conversion, summed lane by lane: see row_sum) */
    nl_v8 acc = {0};
    for (; i + 8 <= k; i += 8) {
        nl_v8 a = V8(p + i) - m;
        acc += sq ? a * a : a;
    }
    for (int j = 0; j < 8; j++) s += acc[j];
#endif
#pragma omp simd reduction(+ : s)
    for (i64 j = i; j < k; j++) {
        F a = LD(p[j]) - m;
        s += sq ? a * a : a;
    }
#endif
    return s;
}

/* the whole row's sum, chunk by chunk (CF_CHUNK values in A, the chunks in double) */
static inline __attribute__((always_inline)) double S(rows_total)(const T *p, i64 C, F m, int sq) {
    double s = 0.0;
    for (i64 i = 0; i < C; i += CF_CHUNK) s += S(rows_sum)(p + i, MIN(CF_CHUNK, C - i), m, sq);
    return s;
}

/* w and b (NULL: 1 and 0) in the rows' channel order (ROWS_AT), in F: 2 C values */
static F *S(rows_params)(const F *weight, const F *bias, i64 C) {
    F *wb = malloc(sizeof(F) * 2 * (size_t)C);
    if (wb)
        for (i64 c = 0; c < C; c++) {
            i64 at = ROWS_AT(c, C);
            wb[at] = weight ? weight[c] : (F)1;
            wb[C + at] = bias ? bias[c] : (F)0;
        }
    return wb;
}

/* one row's output, o[c] = MAP(dy[c], x[c], c) rounded to T: ROW_OUT with the channel's index
 * passed to MAP (the rows' factors are per channel, in ROWS_AT order; ROW_OUT's per row) */
#if PAIRED_OUT
#define ROWS_MAP(o, d, p, C, MAP)                                                                              \
    do {                                                                                                       \
        if (!((C) & 1)) {                                                                                      \
            const i64 h_ = (C) / 2;                                                                            \
            const nl_pair *dw_ = (const nl_pair *)(d), *pw_ = (const nl_pair *)(p);                            \
            nl_pair *ow_ = (nl_pair *)(o);                                                                     \
            (void)dw_;                                                                                         \
            _Pragma("omp simd") for (i64 j_ = 0; j_ < h_; j_++) ow_[j_] =                                      \
                ST_PAIR(MAP(LD_LO(dw_[j_]), LD_LO(pw_[j_]), j_), MAP(LD_HI(dw_[j_]), LD_HI(pw_[j_]), h_ + j_)); \
        } else {                                                                                               \
            _Pragma("omp simd") for (i64 c_ = 0; c_ < (C); c_++) (o)[c_] = ST(MAP(LD((d)[c_]), LD((p)[c_]), c_)); \
        }                                                                                                      \
    } while (0)
#else
#define ROWS_MAP(o, d, p, C, MAP) CL_ROW(o, d, p, C, MAP)
#endif

/* mean (center; NULL for RMS) and rstd: float64 (M,), for the backward */
int S(nl_rows_fwd)(const T *x, T *y, i64 M, i64 C, double eps, const F *weight, const F *bias, int center,
                   double *mean, double *rstd, int nt) {
    F *wb = S(rows_params)(weight, bias, C);
    if (!wb) return 1;
    const F *w = wb, *b = wb + C;
    const i64 block = MAX(1, MIN(ROWS_BLOCK, ROWS_BLOCK_BYTES / (C * (i64)sizeof(T))));
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r0 = 0; r0 < M; r0 += block) {
        const i64 nr = MIN(block, M - r0);
        F mb[ROWS_BLOCK] = {0}, rb[ROWS_BLOCK];
        if (center)
            for (i64 i = 0; i < nr; i++) mb[i] = (F)(S(rows_total)(x + (r0 + i) * C, C, 0, 0) / C);
        for (i64 i = 0; i < nr; i++) {
            double v = S(rows_total)(x + (r0 + i) * C, C, mb[i], 1) / C;
            rb[i] = (F)(1.0 / sqrt(v + eps));
            if (center) mean[r0 + i] = mb[i];
            rstd[r0 + i] = rb[i];
        }
        for (i64 i = 0; i < nr; i++) {
            const F m = mb[i], rs = rb[i];
#define MAP(dv, pv, c) ((pv) - m) * rs * w[c] + b[c]
            ROWS_MAP(y + (r0 + i) * C, x + (r0 + i) * C, x + (r0 + i) * C, C, MAP);
#undef MAP
        }
    }
    free(wb);
    return 0;
}

/* the row's A1 = sum w dy and A2 = sum w dy (x - m) (w in the rows' channel order), CF_CHUNK
 * values at a time in A, the chunks in double; with SUMS (a literal) it also adds each
 * channel's dy (x - m) rs and dy to them, the weight's and bias's gradients, in the same read */
#define ROWS_DOT(dv, pv, c)                                                                                    \
    do {                                                                                                       \
        F g_ = w[c] * (dv), e_ = (pv) - m;                                                                     \
        s1 += g_;                                                                                              \
        s2 += g_ * e_;                                                                                         \
        if (SUMS) {                                                                                            \
            gw[c] += (dv) * e_ * rs;                                                                           \
            gb[c] += (dv);                                                                                     \
        }                                                                                                      \
    } while (0)
static inline __attribute__((always_inline)) void S(rows_dots)(const T *d, const T *p, const F *w, i64 C, F m, F rs,
                                                                 F *gw, F *gb, const int SUMS, double *a1,
                                                                 double *a2) {
    double t1 = 0.0, t2 = 0.0;
#if PAIRED_OUT
    if (!(C & 1)) {
        const i64 h = C / 2;
        const nl_pair *dw = (const nl_pair *)d, *pw = (const nl_pair *)p;
        for (i64 j0 = 0; j0 < h; j0 += CF_CHUNK / 2) {
            A s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
            for (i64 j = j0; j < MIN(h, j0 + CF_CHUNK / 2); j++) {
                ROWS_DOT(LD_LO(dw[j]), LD_LO(pw[j]), j);
                ROWS_DOT(LD_HI(dw[j]), LD_HI(pw[j]), h + j);
            }
            t1 += s1;
            t2 += s2;
        }
        *a1 = t1;
        *a2 = t2;
        return;
    }
#endif
    for (i64 c0 = 0; c0 < C; c0 += CF_CHUNK) {
        A s1 = 0, s2 = 0;
        i64 c = c0, end = MIN(C, c0 + CF_CHUNK);
#if F16C_CHUNKS /* (eight values a conversion, the sums lane by lane, then added) */
        {
            A l1[8] = {0}, l2[8] = {0};
            for (; c + 8 <= end; c += 8) {
                float dv[8], pv[8];
                S(chunk_in)(dv, d + c, 8);
                S(chunk_in)(pv, p + c, 8);
#pragma omp simd
                for (int j = 0; j < 8; j++) {
                    A s1 = l1[j], s2 = l2[j]; /* (lane j's sums, which ROWS_DOT adds to) */
                    ROWS_DOT(dv[j], pv[j], c + j);
                    l1[j] = s1, l2[j] = s2;
                }
            }
            for (int j = 0; j < 8; j++) s1 += l1[j], s2 += l2[j];
        }
#endif
#pragma omp simd reduction(+ : s1, s2)
        for (i64 j = c; j < end; j++) ROWS_DOT(LD(d[j]), LD(p[j]), j);
        t1 += s1;
        t2 += s2;
    }
    *a1 = t1;
    *a2 = t2;
}
#undef ROWS_DOT

/* the input gradient into dx; the weight's and bias's (dw, db: float64 (C,), NULL where not
 * wanted) summed per thread in F over at most MAX_ROWS rows, then in double, added in thread
 * order (deterministic for a thread count) */
int S(nl_rows_bwd)(const T *dy, const T *x, T *dx, i64 M, i64 C, const F *weight, int center, const double *mean,
                   const double *rstd, double *dw, double *db, int nt) {
    int failed = 0;
    F *wb = S(rows_params)(weight, NULL, C);
    double *part = calloc((size_t)nt * 2 * C, sizeof(double));
    if (!wb || !part) {
        free(wb);
        free(part);
        return 1;
    }
    const F *w = wb;
#pragma omp parallel num_threads(nt)
    {
        double *mine = part + (i64)omp_get_thread_num() * 2 * C;
        F *fw = calloc(2 * (size_t)C, sizeof(F)); /* dw and db over up to MAX_ROWS rows, then into mine */
        i64 pending = 0;
        if (!fw) failed = 1;
#pragma omp for schedule(static)
        for (i64 r = 0; r < M; r++) {
            if (!fw) continue;
            const i64 at = r * C;
            const double rsd = rstd[r];
            const F m = center ? (F)mean[r] : (F)0, rs = (F)rsd;
            double s1, s2;
            if (dw || db)
                S(rows_dots)(dy + at, x + at, w, C, m, rs, fw, fw + C, 1, &s1, &s2);
            else
                S(rows_dots)(dy + at, x + at, w, C, m, rs, NULL, NULL, 0, &s1, &s2);
            if ((dw || db) && ++pending == MAX_ROWS) {
                for (i64 c = 0; c < 2 * C; c++) {
                    mine[c] += fw[c];
                    fw[c] = 0;
                }
                pending = 0;
            }
            const F k1 = center ? (F)(-rsd * s1 / C) : (F)0, k2 = (F)(-rsd * rsd * rsd * s2 / C);
#define MAP(dv, pv, c) rs * w[c] * (dv) + k1 + ((pv) - m) * k2
            ROWS_MAP(dx + at, dy + at, x + at, C, MAP);
#undef MAP
        }
        if (fw)
            for (i64 c = 0; c < 2 * C; c++) mine[c] += fw[c];
        free(fw);
    }
    for (i64 c = 0; c < C; c++) {
        const i64 at = ROWS_AT(c, C);
        double sw = 0.0, sb = 0.0;
        for (int t = 0; t < nt; t++) {
            sw += part[(i64)t * 2 * C + at];
            sb += part[(i64)t * 2 * C + C + at];
        }
        if (dw) dw[c] = sw;
        if (db) db[c] = sb;
    }
    free(wb);
    free(part);
    return failed;
}
