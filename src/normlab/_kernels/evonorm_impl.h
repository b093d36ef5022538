/* EvoNorm's element maps (Liu et al., NeurIPS 2020) for one storage type T (arithmetic F,
 * accumulator A, channel block CB, names S(...), LD/ST, EP_SIGMOIDA as in kernels_impl.h).
 * Included by kernels.c once per type, after kernels_impl.h.
 *
 * Unlike the other norms, EvoNorm's output is not an affine map of x per (n, c) but
 * y = f(x) * scale + shift with an element map f of a kind (per channel v, per (n, c) D, E):
 *
 *   kind 0, S0   f(x) = x s,  s = sigmoid(v x)          slope f'(x) = s + v x s (1 - s)
 *   kind 1, B0   f(x) = x u,  u = 1 / max(D, v x + E)   slope dy/dx: u where D >= v x + E (left),
 *                                                       E u^2 elsewhere (right)
 *
 *   evonorm_fwd   y = f(x) * scale + shift                                    read x, write y    2T
 *   evonorm_red   per (n, c) five sums: t0 = sum dy f(x), t1 = sum dy, and    read dy, x         2T
 *                 S0: t2 = sum dy x^2 s (1 - s) (t3 = t4 = 0);
 *                 B0: t2 = sum_left dy x u^2, t3 = sum_right dy x u^2, t4 = sum_right dy x^2 u^2
 *   evonorm_dx    dx = a * dy * slope(x) + b * (x - m) + k                    read 2, write      3T
 *
 * With keep (the input-gradient buffer), evonorm_red also stores dy * slope(x) there (in x's
 * type) and evonorm_dx reads it back instead of evaluating the map's slope again: S0 does (a
 * sigmoid a value, dearer than the extra write and read), B0 does not (a division: cheaper).
 *
 * Channel-first outputs of float32 and float64 larger than the last-level cache are streamed
 * (evonorm_fwd, evonorm_dx without keep: STREAMED, kernels.c's streams): measured one thread,
 * (32, 64, 3136) float32, B0's forward 0.76-0.90x and input gradient 0.72-0.83x of plain stores.
 * Channels-last ones too, EV_CHUNK / C rows at a time computed into an L1 buffer and streamed out
 * (EV_STREAMED_ROWS, where C <= EV_CHUNK / 2). When these passes loaded every coefficient once a
 * row that took 1.06-1.19x (forward) and 1.07-1.16x (input gradient) of plain stores; with two
 * rows a step (ROW_STEPS, below), two threads, from memory: input gradient 0.91-0.94x as a pass,
 * forward 0.89-1.03x, and the layer's step 0.93-0.99x (paired, in one process).
 *
 * (the statistics come from the moments kernel; the adjoints are in
 * normlab/engine/describe_modern.py). Per-(n, c) arrays are double (N, C) (D, E unused by S0);
 * the five sums are (N, C) arrays one after the other. Two layouts as the other kernels:
 * (N, C, L) "cf" and (N, L, C) "cl". Sums are accumulated in A over at most CF_CHUNK values of
 * a channel-first row or one block of channels-last rows (rows_per_block), then in double in
 * a fixed order. Each loop is compiled once per kind (EV_SWITCH, a literal constant). */

#ifndef EV_SWITCH
#define EV_SWITCH(kind, M)                                                                                     \
    do {                                                                                                       \
        if (kind) {                                                                                            \
            M(1)                                                                                               \
        } else {                                                                                               \
            M(0)                                                                                               \
        }                                                                                                      \
    } while (0)
#endif

/* S0's sigmoid, s = sigmoid(v x) = 1 / (1 + 2^t) with t = c x, c = -v log2(e) folded per channel
 * (EV_COEF), t clamped to [-125, 125] (where s is 1 or 0 to float precision, so 2^t stays a
 * normal float), 2^t by mathfn.h's nl_exp2f (float32) or nl_exp2_half (the half types). About
 * half the operations of 1 / (1 + EP_EXPA(-v x)), whose general range reduction (ln 2 in
 * parts, the scaling by 1 / ln 2, the negation) this folding avoids. Float64: libm. */
#define EV_COEF(v) (-(v) * 1.4426950408889634)
/* the clamp's bound, 125, read from mathfn.h's nl_act_bounds (EV_LIMIT(lim) at the top of a
 * kernel), for the reason given there: with a literal, GCC splits every vector loop into the
 * clamped paths' constant results and the rest, which costs more than the clamp */
#define EV_LIMIT(lim) const F lim = (F)nl_act_bounds[3]
#if UNIT(2)
#define EV_SIGMOID(xv, vc, cc, lim) ((void)(lim), (F)1 / ((F)1 + exp2((cc) * (xv))))
#define EV_TIMES_SIGMOID(xv, vc, cc, lim) ((void)(lim), (xv) / ((F)1 + exp2((cc) * (xv))))
#else
static inline __attribute__((always_inline)) float S(ev_sig2)(float t, float lim, float num) {
    t = t < -lim ? -lim : t; /* (a NaN stays NaN) */
    t = t > lim ? lim : t;
    return num / (1.0f + (UNIT(1) ? nl_exp2f(t) : nl_exp2_half(t)));
}
#define EV_SIGMOID(xv, vc, cc, lim) S(ev_sig2)((cc) * (xv), lim, 1.0f)
#define EV_TIMES_SIGMOID(xv, vc, cc, lim) S(ev_sig2)((cc) * (xv), lim, xv)
#endif

/* f(x) for the kind (vc = v, cc = EV_COEF(v) of x's channel) */
static inline __attribute__((always_inline)) F S(ev_map)(const int kind, F xv, F vc, F cc, F lim, F D, F E) {
    if (kind == 0) return EV_TIMES_SIGMOID(xv, vc, cc, lim);
    F r = vc * xv + E;
    return xv / (D >= r ? D : r);
}

static inline __attribute__((always_inline)) F S(ev_slope)(const int kind, F xv, F vc, F cc, F lim, F D, F E) {
    if (kind == 0) {
        F s = EV_SIGMOID(xv, vc, cc, lim);
        return s + vc * xv * s * ((F)1 - s);
    }
    /* (the side as a 0/1 factor, not a second select on D >= r: with one, GCC if-converts the
     * reciprocal into two masked divisions, 1 / D and 1 / r, on every vector; this one division
     * made B0's input-gradient pass 0.84-0.92x, float32 channel-first, one thread) */
    F r = vc * xv + E, l = D >= r ? (F)1 : (F)0, u = (F)1 / (D >= r ? D : r);
    return u * (l + ((F)1 - l) * E * u);
}

/* the five terms of one element (see above), and sl_ = slope(x). S0 with w_ = x s (1 - s):
 * t0 = dy x s, t2 = dy x w_, slope s + v w_. B0 with q_ = dy x u^2: t2, t3 = q_ on the left,
 * right side, t4 = x t3, slope u (left) or E u^2 (right). */
#define EV_TERMS(kind, xv, dv, vc, cc, lim, D, E)                                                              \
    F t0, t1 = (dv), t2, t3, t4, sl_;                                                                          \
    if ((kind) == 0) {                                                                                         \
        F s_ = EV_SIGMOID(xv, vc, cc, lim);                                                                    \
        F xs_ = (xv) * s_, w_ = xs_ - xs_ * s_, dx_ = (dv) * (xv);                                             \
        t0 = (dv) * xs_;                                                                                       \
        t2 = dx_ * w_;                                                                                         \
        t3 = t4 = 0;                                                                                           \
        sl_ = s_ + (vc) * w_;                                                                                  \
    } else {                                                                                                   \
        F r_ = (vc) * (xv) + (E), l_ = (D) >= r_ ? (F)1 : (F)0, u_ = (F)1 / ((D) >= r_ ? (D) : r_);            \
        F du_ = (dv) * (xv) * u_, q_ = du_ * u_;                                                               \
        t0 = du_;                                                                                              \
        t2 = l_ * q_;                                                                                          \
        t3 = q_ - t2;                                                                                          \
        t4 = t3 * (xv);                                                                                        \
        sl_ = l_ * u_ + ((F)1 - l_) * (E) * u_ * u_;                                                           \
    }

/* ---- channel-first (N, C, L): one (n, c) row at a time ---- */

/* the input gradient of one value xv (dv: dy, or with kept dy slope(x)) for the map's coefficients
 * vc, cc, D, E and the gradient's a, b, m and (with_k, a literal) kc */
#define EV_DX0(kind, kept, dv, xv, vc, cc, lim, D, E, a, b, m)                                                 \
    ((kept ? (a) * (dv) : (a) * (dv) * S(ev_slope)(kind, xv, vc, cc, lim, D, E)) + (b) * ((xv) - (m)))
#define EV_DX(kind, kept, dv, xv, vc, cc, lim, D, E, a, b, m, kc, with_k)                                      \
    ((with_k) ? EV_DX0(kind, kept, dv, xv, vc, cc, lim, D, E, a, b, m) + (kc)                                  \
              : EV_DX0(kind, kept, dv, xv, vc, cc, lim, D, E, a, b, m))

/* one channel-first row of k values: the forward (p into o) and the input gradient (from dy at d,
 * or with kept from dy slope(x) in o; with_k a literal), with the row's coefficients (kernels_impl.h's
 * ROW_OUT: bfloat16 two values a 32-bit word) */
static inline __attribute__((always_inline)) void S(ev_fwd_row)(const int kind, const T *p, T *o, i64 k, F vc, F cc,
                                                                F lim, F D, F E, F s, F b) {
#define MAP(_, xv, X) (S(ev_map)(kind, xv, vc, cc, lim, D, E) * s + b)
    ROW_OUT(o, p, p, k, MAP, 0);
#undef MAP
}

static inline __attribute__((always_inline)) void S(ev_dx_row)(const int kind, const int kept, const int with_k,
                                                               const T *d, const T *p, T *o, i64 k, F vc, F cc, F lim,
                                                               F D, F E, F a, F b, F m, F kc) {
#define DXV(dv, xv, X) EV_DX(kind, kept, dv, xv, vc, cc, lim, D, E, a, b, m, kc, with_k)
    ROW_OUT(o, kept ? o : d, p, k, DXV, 0);
#undef DXV
}

int S(nl_evonorm_fwd_cf)(const T *x, T *y, i64 N, i64 C, i64 L, int kind, const double *v, const double *dstd,
                         const double *istd, const double *scale, const double *shift, int rowmask, int nt) {
    REPEAT_ROWS(4, &dstd, &istd, &scale, &shift);
    EV_LIMIT(lim);
    const int st = STREAMABLE && streams(N * C * L * (i64)sizeof(T));
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static) nowait
        for (i64 r = 0; r < N * C; r++) {
            const F vc = (F)v[r % C], cc = (F)EV_COEF(v[r % C]), D = (F)dstd[r], E = (F)istd[r], s = (F)scale[r],
                    b = (F)shift[r];
#define LOOP(K) STREAMED(st, y + r * L, L, S(ev_fwd_row)(K, x + r * L + i0_, o_, k_, vc, cc, lim, D, E, s, b));
            EV_SWITCH(kind, LOOP);
#undef LOOP
        }
        stream_fence(st);
    }
    free(rep_);
    return 0;
}

/* the five sums of a run of k values, added to acc */
static inline __attribute__((always_inline)) void S(ev_run_red)(const int kind, const T *d, const T *p, i64 k, F vc,
                                                                F cc, F lim, F D, F E, double *acc, T *kp) {
    A a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0;
/* the terms of the values xv, dv into the sums, after KEEP (a statement, which may read dy slope(x) as
 * (dv) * sl_) */
#define ADD(xv, dv, KEEP)                                                                                      \
    {                                                                                                          \
        EV_TERMS(kind, xv, dv, vc, cc, lim, D, E)                                                              \
        KEEP;                                                                                                  \
        a0 += t0, a1 += t1, a2 += t2;                                                                          \
        if (kind) a3 += t3, a4 += t4; /* (S0: none) */                                                         \
    }
    i64 i = 0;
#if PAIRED_OUT
    { /* bfloat16: two values a 32-bit word, as kernels_impl.h's affine_row */
        const nl_pair *dw = (const nl_pair *)d, *pw = (const nl_pair *)p;
        nl_pair *qw = (nl_pair *)kp;
        if (kp) { /* (two loops: no branch inside the vector loop) */
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4)
            for (i64 j = 0; j < k / 2; j++) {
                F lo, hi;
                ADD(LD_LO(pw[j]), LD_LO(dw[j]), lo = LD_LO(dw[j]) * sl_)
                ADD(LD_HI(pw[j]), LD_HI(dw[j]), hi = LD_HI(dw[j]) * sl_)
                qw[j] = ST_PAIR(lo, hi);
            }
        } else {
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4)
            for (i64 j = 0; j < k / 2; j++) {
                ADD(LD_LO(pw[j]), LD_LO(dw[j]), (void)sl_)
                ADD(LD_HI(pw[j]), LD_HI(dw[j]), (void)sl_)
            }
        }
        i = k & ~(i64)1; /* (an odd last value below) */
    }
#elif F16C_CHUNKS
    { /* float16 with F16C: eight values at a time converted by one instruction (kernels_impl.h's
       * row_sum), their terms summed lane by lane, the lanes added at the end */
        A l0[8] = {0}, l1[8] = {0}, l2[8] = {0}, l3[8] = {0}, l4[8] = {0};
#define CHUNKS(KEEP, OUT)                                                                                      \
    for (; i + 8 <= k; i += 8) {                                                                               \
        float xv[8], dv[8], kv[8];                                                                             \
        S(chunk_in)(xv, p + i, 8);                                                                             \
        S(chunk_in)(dv, d + i, 8);                                                                             \
        _Pragma("omp simd") for (int j = 0; j < 8; j++) {                                                      \
            EV_TERMS(kind, xv[j], dv[j], vc, cc, lim, D, E)                                                    \
            KEEP;                                                                                              \
            l0[j] += t0, l1[j] += t1, l2[j] += t2;                                                             \
            if (kind) l3[j] += t3, l4[j] += t4;                                                                \
        }                                                                                                      \
        OUT;                                                                                                   \
    }
        if (kp)
            CHUNKS(kv[j] = dv[j] * sl_, S(chunk_out)(kp + i, kv, 8))
        else
            CHUNKS((void)sl_, (void)kv)
#undef CHUNKS
        for (int j = 0; j < 8; j++) a0 += l0[j], a1 += l1[j], a2 += l2[j], a3 += l3[j], a4 += l4[j];
    }
#endif
    if (kp) {
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4)
        for (i64 j = i; j < k; j++) {
            F xv = LD(p[j]), dv = LD(d[j]);
            ADD(xv, dv, kp[j] = ST(dv * sl_))
        }
    } else {
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4)
        for (i64 j = i; j < k; j++) {
            F xv = LD(p[j]), dv = LD(d[j]);
            ADD(xv, dv, (void)sl_)
        }
    }
#undef ADD
    acc[0] += a0, acc[1] += a1, acc[2] += a2;
    if (kind) acc[3] += a3, acc[4] += a4;
}

int S(nl_evonorm_red_cf)(const T *dy, const T *x, i64 N, i64 C, i64 L, int kind, const double *v,
                         const double *dstd, const double *istd, double *sums, T *keep, int rowmask, int nt) {
    REPEAT_ROWS(2, &dstd, &istd);
    EV_LIMIT(lim);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * C; r++) {
        double acc[5] = {0};
        const F vc = (F)v[r % C], cc = (F)EV_COEF(v[r % C]), D = (F)dstd[r], E = (F)istd[r];
        for (i64 i0 = 0; i0 < L; i0 += CF_CHUNK) {
            const T *d = dy + r * L + i0, *p = x + r * L + i0;
            i64 k = MIN(CF_CHUNK, L - i0);
#define RED(K) S(ev_run_red)(K, d, p, k, vc, cc, lim, D, E, acc, keep ? keep + r * L + i0 : NULL);
            EV_SWITCH(kind, RED);
#undef RED
        }
        for (int j = 0; j < 5; j++) sums[j * N * C + r] = acc[j];
    }
    free(rep_);
    return 0;
}

int S(nl_evonorm_dx_cf)(const T *dy, const T *x, T *dx, i64 N, i64 C, i64 L, int kind, const double *v,
                        const double *dstd, const double *istd, const double *a, const double *b, const double *m,
                        const double *k, const T *kept, int rowmask, int nt) {
    REPEAT_ROWS(6, &dstd, &istd, &a, &b, &m, &k);
    EV_LIMIT(lim);
    const int st = STREAMABLE && !kept && streams(N * C * L * (i64)sizeof(T)); /* (kept: dx is read: in cache) */
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static) nowait
        for (i64 r = 0; r < N * C; r++) {
            const F vc = (F)v[r % C], cc = (F)EV_COEF(v[r % C]), D = (F)dstd[r], E = (F)istd[r], ar = (F)a[r],
                    br = (F)b[r], mr = (F)m[r], kr = (F)k[r];
            if (kept) { /* dy slope(x), kept in dx by evonorm_red */
                S(ev_dx_row)(0, 1, 1, NULL, x + r * L, dx + r * L, L, vc, cc, lim, D, E, ar, br, mr, kr);
                continue;
            }
#define LOOP(K)                                                                                                \
    STREAMED(st, dx + r * L, L,                                                                                \
             S(ev_dx_row)(K, 0, 1, dy + r * L + i0_, x + r * L + i0_, o_, k_, vc, cc, lim, D, E, ar, br, mr, kr));
            EV_SWITCH(kind, LOOP);
#undef LOOP
        }
        stream_fence(st);
    }
    free(rep_);
    return 0;
}

/* ---- channels-last (N, L, C): the element passes in runs of rows within a sample (SAMPLE_RUNS)
 * with the sample's coefficients as F rows; the reduction per (sample, block of rows), CB
 * channels at a time ---- */

/* ``count`` per-(n, c) arrays as F rows (N * C each; kernels_impl.h's coef_rows, rows of rowmask
 * repeated), then v and EV_COEF(v) as F rows of C; NULL if out of memory */
static F *S(ev_coefs)(const double *const *src, int count, i64 N, i64 C, int rowmask, const double *v) {
    F *co = S(coef_rows)(src, count, N, C, rowmask, 2 * C);
    if (co)
        for (i64 c = 0; c < C; c++) co[N * C * count + c] = (F)v[c], co[N * C * count + C + c] = (F)EV_COEF(v[c]);
    return co;
}

/* The 16-bit types' channels-last passes (but float16 where F16C converts it: row by row, eight
 * values a conversion, below) take runs of rows within one sample (SAMPLE_RUNS) and read them CB
 * channels at a time as 32-bit words of two channels (kernels_impl.h: block_moments2), the
 * block's coefficients held once a run in the PAIR_AT layout (to_pairs_n): without the
 * lane-crossing shuffles that widen 16-bit values, the division per row and the row loop's setup
 * over C. Measured bfloat16 (32, 3136, 64), two threads, over the row-by-row loops (which took
 * 1.3-1.4x their channel-first passes): forward B0 0.62, S0 0.77; sums B0 0.82, S0 0.90; input
 * gradient B0 0.78, S0 (kept) 0.63-0.70; S0 per sample 0.84-0.90. float32, float64 and float16
 * without F16C go over plain rows of F coefficients in the same runs, B0's passes
 * and S0's forward two rows a step (ROW_STEPS): each channel's five to eight coefficients are
 * loaded once for both rows, which halves the loads that bound these loops (a vector of
 * output took one load of every coefficient besides its one or two of data). Measured float32
 * (8, 784, 64) from cache, one thread, over one row a step: B0's forward 0.68-0.70, sums 0.86-0.94, input
 * gradient 0.44-0.49 (with its one division and with_k, below); S0's forward 0.89-0.91. From memory,
 * (32, 3136, 64), two threads: B0's input gradient 0.86-0.89, sums 1.0, forward 1.05 (0.92-1.12
 * over runs). S0's sums stay one row a step (two: 1.02-1.04x; its sigmoid's temporaries), as
 * does the kept gradient. */

/* rows [0, k) of a channels-last run, channels [c0, C) a vector loop, with two (a literal) two
 * rows a step (then a last odd one), else one: PRE(c) once per channel and step (loading its
 * coefficients into locals, so that the second row takes them from registers), ROW(c, l) per
 * row, POST(c) after them */
#define ROW_STEPS(two, k, c0, C, PRE, ROW, POST)                                                               \
    do {                                                                                                       \
        i64 l_ = (c0) < (C) ? 0 : (k); /* (no channels left: no rows) */                                       \
        for (; (two) && l_ + 1 < (k); l_ += 2) {                                                               \
            _Pragma("omp simd") for (i64 c_ = (c0); c_ < (C); c_++) {                                          \
                PRE(c_) ROW(c_, l_) ROW(c_, l_ + 1) POST(c_)                                                   \
            }                                                                                                  \
        }                                                                                                      \
        for (; l_ < (k); l_++) {                                                                               \
            _Pragma("omp simd") for (i64 c_ = (c0); c_ < (C); c_++) {                                          \
                PRE(c_) ROW(c_, l_) POST(c_)                                                                   \
            }                                                                                                  \
        }                                                                                                      \
    } while (0)
#define NO_POST(c)

/* rows [0, rows) of a channels-last output at out (row stride C), RUNTO(o, j, kk) writing rows
 * [j, j + kk) of the run to o: in place, or with st (EV_STREAMS) EV_CHUNK / C rows at a time into
 * an L1 buffer streamed out (kernels.c: streams, stream_copy). EV_CHUNK is twice kernels.c's
 * STREAM_CHUNK so that a chunk holds a two-row step for up to 256 channels. */
#define EV_CHUNK 512
#define EV_STREAMS(C, values) (STREAMABLE && (C) <= EV_CHUNK / 2 && streams((values) * (i64)sizeof(T)))
#define EV_STREAMED_ROWS(st, out, rows, C, RUNTO)                                                              \
    do {                                                                                                       \
        if (!(st)) {                                                                                           \
            RUNTO((out), 0, (rows));                                                                           \
        } else {                                                                                               \
            T buf_[EV_CHUNK] __attribute__((aligned(64)));                                                     \
            const i64 rb_ = EV_CHUNK / (C);                                                                    \
            for (i64 j_ = 0; j_ < (rows); j_ += rb_) {                                                         \
                const i64 kk_ = MIN(rb_, (rows) - j_);                                                         \
                RUNTO(buf_, j_, kk_);                                                                          \
                stream_copy((out) + j_ * (C), buf_, kk_ * (C) * (i64)sizeof(T));                               \
            }                                                                                                  \
        }                                                                                                      \
    } while (0)

/* rows [0, k) of one sample's channels [0, C) of the forward, x at p into o; vr, cr, D, E, s, b
 * the sample's coefficient rows */
static inline __attribute__((always_inline)) void S(ev_fwd_run_cl)(const int kind, const T *p, T *o, i64 k, i64 C,
                                                                   const F *vr, const F *cr, F lim, const F *D,
                                                                   const F *E, const F *s, const F *b) {
    i64 c0 = 0;
#if PAIRED_OUT
    for (; c0 + CB <= C; c0 += CB) {
        const i64 H = CB / 2;
        F cf[6][CB]; /* v, EV_COEF(v), scale, shift, D, E (S0: no D, E) */
        const F *src[6] = {vr + c0, cr + c0, s + c0, b + c0, D + c0, E + c0};
        S(to_pairs_n)(cf, src, kind ? 6 : 4);
#define MAP(xv, i) (S(ev_map)(kind, xv, cf[0][i], cf[1][i], lim, kind ? cf[4][i] : 0, kind ? cf[5][i] : 0) * cf[2][i] + cf[3][i])
        for (i64 l = 0; l < k; l++) {
            const nl_pair *pw = (const nl_pair *)(p + l * C + c0);
            nl_pair *ow = (nl_pair *)(o + l * C + c0);
#pragma omp simd
            for (i64 j = 0; j < H; j++) ow[j] = ST_PAIR(MAP(LD_LO(pw[j]), j), MAP(LD_HI(pw[j]), H + j));
        }
#undef MAP
    }
#elif F16C_CHUNKS /* float16: row by row, eight values a conversion (kernels_impl.h's CL_ROW) */
#define MAP(_, xv, c) (S(ev_map)(kind, xv, vr[c], cr[c], lim, D[c], E[c]) * s[c] + b[c])
    for (i64 l = 0; l < k; l++) CL_ROW(o + l * C, p + l * C, p + l * C, C, MAP);
#undef MAP
    c0 = C;
#endif
#define PRE(c) const F vc = vr[c], cc = cr[c], Dc = D[c], Ec = E[c], sc = s[c], bc = b[c];
#define ROW(c, l) o[(l) * C + (c)] = ST(S(ev_map)(kind, LD(p[(l) * C + (c)]), vc, cc, lim, Dc, Ec) * sc + bc);
    ROW_STEPS(1, k, c0, C, PRE, ROW, NO_POST);
#undef PRE
#undef ROW
}

int S(nl_evonorm_fwd_cl)(const T *x, T *y, i64 N, i64 L, i64 C, int kind, const double *v, const double *dstd,
                         const double *istd, const double *scale, const double *shift, int rowmask, int nt) {
    EV_LIMIT(lim);
    const double *src[4] = {dstd, istd, scale, shift};
    F *co = S(ev_coefs)(src, 4, N, C, rowmask, v);
    if (!co) return 1;
    const F *vr = co + 4 * N * C, *cr = vr + C;
#define SEG(n, l0, k)                                                                                          \
    {                                                                                                          \
        const i64 at = ((n) * L + (l0)) * C, rows = (k);                                                       \
        const F *D = co + (n) * C, *E = co + (N + (n)) * C, *s = co + (2 * N + (n)) * C, *b = co + (3 * N + (n)) * C; \
        EV_SWITCH(kind, RUN);                                                                                  \
    }
    const int st = EV_STREAMS(C, N * L * C);
#define TO(o, j, kk) S(ev_fwd_run_cl)(K_, x + at + (j) * C, o, kk, C, vr, cr, lim, D, E, s, b)
#define RUN(K)                                                                                                 \
    {                                                                                                          \
        const int K_ = K;                                                                                      \
        EV_STREAMED_ROWS(st, y + at, rows, C, TO);                                                             \
    }
#pragma omp parallel num_threads(nt)
    {
        SAMPLE_RUNS(N, L, RUN_ROWS(C), SEG);
        stream_fence(st);
    }
#undef TO
#undef RUN
#undef SEG
    free(co);
    return 0;
}

/* the five sums' loops (ev_block_red1): EV_PRE(c) loads a channel's coefficients and zeroes its
 * sums, EV_ROW_TERMS adds one row's terms of the values xv_, dv_ (after KEEP_, a statement that
 * may read dy slope(x) as dv * sl_), EV_POST(c) adds the sums into the block's a0 .. a4 */
#define EV_PRE(c)                                                                                              \
    const F vc = vr[c], cc = cr[c], Dc = D[c], Ec = E[c];                                                      \
    A s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0;
#define EV_ROW_TERMS(kind, xv_, dv_, KEEP_)                                                                    \
    {                                                                                                          \
        const F xv = xv_, dv = dv_;                                                                            \
        EV_TERMS(kind, xv, dv, vc, cc, lim, Dc, Ec)                                                            \
        KEEP_;                                                                                                 \
        s0 += t0, s1 += t1, s2 += t2;                                                                          \
        if (kind) s3 += t3, s4 += t4;                                                                          \
    }
#define EV_POST(c)                                                                                             \
    a0[c] += s0, a1[c] += s1, a2[c] += s2;                                                                     \
    if (kind) a3[c] += s3, a4[c] += s4;
/* the five sums of rows [0, k) of a block, channels [0, w) of a channel block, into acc (5 x CB) */
static inline __attribute__((always_inline)) void S(ev_block_red1)(const int kind, const T *d0, const T *p0, i64 k,
                                                                  i64 C, i64 w, const F *vr, const F *cr, F lim, const F *D, const F *E,
                                                                  A *acc, T *kp) {
    A *a0 = acc, *a1 = acc + CB, *a2 = acc + 2 * CB, *a3 = acc + 3 * CB, *a4 = acc + 4 * CB;
    for (i64 c = 0; c < 5 * CB; c++) acc[c] = 0;
#if F16C_CHUNKS
    /* float16: each two rows' w channels converted to float first, eight values an instruction
     * (kernels_impl.h's chunk_in), the sums then the same loops on them, in the same order;
     * dy slope(x) kept as float and converted back the same way */
    float xb[2 * CB], db[2 * CB], kb[2 * CB];
    for (i64 l0 = 0; l0 < k; l0 += 2) {
        const i64 kk = MIN(2, k - l0);
        for (i64 j = 0; j < kk; j++) {
            S(chunk_in_n)(xb + j * CB, p0 + (l0 + j) * C, w);
            S(chunk_in_n)(db + j * CB, d0 + (l0 + j) * C, w);
        }
#define ROW_(c, l) EV_ROW_TERMS(kind, xb[(l) * CB + (c)], db[(l) * CB + (c)], (void)sl_)
#define ROWK_(c, l) EV_ROW_TERMS(kind, xb[(l) * CB + (c)], db[(l) * CB + (c)], kb[(l) * CB + (c)] = dv * sl_)
        if (kp) { /* (two loops: no branch inside the vector loop) */
            ROW_STEPS(kind, kk, 0, w, EV_PRE, ROWK_, EV_POST);
            for (i64 j = 0; j < kk; j++) S(chunk_out_n)(kp + (l0 + j) * C, kb + j * CB, w);
        } else
            ROW_STEPS(kind, kk, 0, w, EV_PRE, ROW_, EV_POST);
#undef ROW_
#undef ROWK_
    }
#else
#define ROW_(c, l) EV_ROW_TERMS(kind, LD(p0[(l) * C + (c)]), LD(d0[(l) * C + (c)]), (void)sl_)
#define ROWK_(c, l) EV_ROW_TERMS(kind, LD(p0[(l) * C + (c)]), LD(d0[(l) * C + (c)]), kp[(l) * C + (c)] = ST(dv * sl_))
    if (kp) /* (two loops: no branch inside the vector loop) */
        ROW_STEPS(kind, k, 0, w, EV_PRE, ROWK_, EV_POST);
    else
        ROW_STEPS(kind, k, 0, w, EV_PRE, ROW_, EV_POST);
#undef ROW_
#undef ROWK_
#endif
}
#undef EV_PRE
#undef EV_ROW_TERMS
#undef EV_POST

#if PAIRED_OUT
/* the same over CB channels as pairs, the coefficients and sums in the PAIR_AT layout */
static inline __attribute__((always_inline)) void S(ev_block_red2)(const int kind, const T *d0, const T *p0, i64 k,
                                                                   i64 C, const F *vr, const F *cr, F lim,
                                                                   const F *D, const F *E, A *acc, T *kp) {
    const i64 H = CB / 2;
    A *a0 = acc, *a1 = acc + CB, *a2 = acc + 2 * CB, *a3 = acc + 3 * CB, *a4 = acc + 4 * CB;
    for (i64 c = 0; c < 5 * CB; c++) acc[c] = 0;
/* channel i's terms of the values xv, dv into its sums; sl_ left in out */
#define TERMS(i, xv, dv, out)                                                                                  \
    {                                                                                                          \
        EV_TERMS(kind, xv, dv, vr[i], cr[i], lim, D[i], E[i])                                                  \
        out = dv * sl_;                                                                                        \
        a0[i] += t0, a1[i] += t1, a2[i] += t2;                                                                 \
        if (kind) a3[i] += t3, a4[i] += t4;                                                                    \
    }
    for (i64 l = 0; l < k; l++) {
        const nl_pair *d = (const nl_pair *)(d0 + l * C), *p = (const nl_pair *)(p0 + l * C);
        if (kp) { /* (two loops: no branch inside the vector loop) */
            nl_pair *q = (nl_pair *)(kp + l * C);
#pragma omp simd
            for (i64 j = 0; j < H; j++) {
                F lo, hi;
                TERMS(j, LD_LO(p[j]), LD_LO(d[j]), lo)
                TERMS(H + j, LD_HI(p[j]), LD_HI(d[j]), hi)
                q[j] = ST_PAIR(lo, hi);
            }
        } else {
#pragma omp simd
            for (i64 j = 0; j < H; j++) {
                F lo, hi;
                TERMS(j, LD_LO(p[j]), LD_LO(d[j]), lo)
                TERMS(H + j, LD_HI(p[j]), LD_HI(d[j]), hi)
                (void)lo, (void)hi;
            }
        }
    }
#undef TERMS
}
#endif

/* the five sums of rows [0, k) of channels [0, w) (w <= CB) into acc (5 x CB, channel order),
 * dy slope(x) into kp with kp; vr, cr, D, E the channels' coefficients */
static inline __attribute__((always_inline)) void S(ev_block_red)(const int kind, const T *d0, const T *p0, i64 k,
                                                                  i64 C, i64 w, const F *vr, const F *cr, F lim,
                                                                  const F *D, const F *E, A *acc, T *kp) {
#if PAIRED_OUT
    if (w == CB) {
        F cf[4][CB];
        A sums[5 * CB];
        const F *src[4] = {vr, cr, D, E};
        S(to_pairs_n)(cf, src, kind ? 4 : 2);
        S(ev_block_red2)(kind, d0, p0, k, C, cf[0], cf[1], lim, cf[kind ? 2 : 0], cf[kind ? 3 : 0], sums, kp);
        for (int j = 0; j < 5; j++)
            for (i64 c = 0; c < CB; c++) acc[j * CB + c] = sums[j * CB + PAIR_AT(c)];
        return;
    }
#endif
    if (w == CB)
        S(ev_block_red1)(kind, d0, p0, k, C, CB, vr, cr, lim, D, E, acc, kp);
    else
        S(ev_block_red1)(kind, d0, p0, k, C, w, vr, cr, lim, D, E, acc, kp);
}

int S(nl_evonorm_red_cl)(const T *dy, const T *x, i64 N, i64 L, i64 C, int kind, const double *v,
                         const double *dstd, const double *istd, double *sums, T *keep, int rowmask, int nt) {
    EV_LIMIT(lim);
    i64 R = rows_per_block(C, sizeof(T)), nb = (L + R - 1) / R, NC = N * C, P = N * nb * C;
    const double *src[2] = {dstd, istd};
    F *co = S(ev_coefs)(src, 2, N, C, rowmask, v);
    double *part = malloc(sizeof(double) * P * 5);
    if (!co || !part) {
        free(co), free(part);
        return 1;
    }
    const F *vr = co + 2 * NC, *cr = vr + C;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 it = 0; it < N * nb; it++) {
        i64 n = it / nb, l0 = (it % nb) * R, k = MIN(R, L - l0);
        for (i64 c0 = 0; c0 < C; c0 += CB) {
            A acc[5 * CB];
            i64 w = MIN(CB, C - c0), at = (n * L + l0) * C + c0;
            const F *D = co + n * C + c0, *E = co + NC + n * C + c0;
#define RED(K) S(ev_block_red)(K, dy + at, x + at, k, C, w, vr + c0, cr + c0, lim, D, E, acc, keep ? keep + at : NULL);
            EV_SWITCH(kind, RED);
#undef RED
            for (int j = 0; j < 5; j++)
                for (i64 c = 0; c < w; c++) part[j * P + it * C + c0 + c] = acc[j * CB + c];
        }
    }
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < NC; r++) { /* the blocks of each sample, in block order */
        i64 n = r / C, c = r % C;
        for (int j = 0; j < 5; j++) {
            double t = 0.0;
            for (i64 b = 0; b < nb; b++) t += part[j * P + (n * nb + b) * C + c];
            sums[j * NC + r] = t;
        }
    }
    free(co), free(part);
    return 0;
}

/* rows [0, k) of one sample's channels [0, C) of the input gradient into o: from dy at d
 * (kept 0) or from dy slope(x) already in o (kept 1, the kind unused); the sample's rows of
 * coefficients vr, cr, D, E (of the map), a, b, m, kc (of the gradient; kc read with with_k, a
 * literal: tested inside the vector loop as a pointer, kc != NULL made the float32 pass 1.55x) */
static inline __attribute__((always_inline)) void S(ev_dx_run_cl)(const int kind, const int kept, const int with_k, const T *d,
                                                                  const T *p, T *o, i64 k, i64 C, const F *vr,
                                                                  const F *cr, F lim, const F *D, const F *E,
                                                                  const F *a, const F *b, const F *m, const F *kc) {
/* the gradient of one value xv of channel i (dv: dy, or with kept dy slope(x)), coefficients q */
#define DX(q, i, dv, xv) EV_DX(kind, kept, dv, xv, (q##v)[i], (q##c)[i], lim, (q##D)[i], (q##E)[i], (q##a)[i], (q##b)[i], \
                               (q##m)[i], with_k ? (q##k)[i] : (F)0, with_k)
    i64 c0 = 0;
#if PAIRED_OUT
    for (; c0 + CB <= C; c0 += CB) {
        const i64 H = CB / 2;
        F cf[8][CB]; /* a, b, m, kc, then (without kept) v, EV_COEF(v), D, E (S0: no D, E) */
        const F *src[8] = {a + c0, b + c0, m + c0, with_k ? kc + c0 : a + c0, vr + c0, cr + c0, D + c0, E + c0};
        S(to_pairs_n)(cf, src, kept ? 4 : kind ? 8 : 6);
        const F *pa = cf[0], *pb = cf[1], *pm = cf[2], *pk = cf[3], *pv = cf[4], *pc = cf[5],
                *pD = cf[kind ? 6 : 4], *pE = cf[kind ? 7 : 4];
        for (i64 l = 0; l < k; l++) {
            const nl_pair *dw = (const nl_pair *)((kept ? o : d) + l * C + c0), *pw = (const nl_pair *)(p + l * C + c0);
            nl_pair *ow = (nl_pair *)(o + l * C + c0);
#pragma omp simd
            for (i64 j = 0; j < H; j++)
                ow[j] = ST_PAIR(DX(p, j, LD_LO(dw[j]), LD_LO(pw[j])), DX(p, H + j, LD_HI(dw[j]), LD_HI(pw[j])));
        }
    }
#elif F16C_CHUNKS
    const F *fv = vr, *fc = cr, *fD = D, *fE = E, *fa = a, *fb = b, *fm = m, *fk = kc; /* (DX's names) */
#define DXC(dv, xv, c) DX(f, c, dv, xv)
    for (i64 l = 0; l < k; l++) CL_ROW(o + l * C, (kept ? o : d) + l * C, p + l * C, C, DXC);
#undef DXC
    c0 = C;
#endif
#undef DX
    const T *dd = kept ? o : d;
#define PRE(c)                                                                                                 \
    const F vc = vr[c], cc = cr[c], Dc = D[c], Ec = E[c], ac = a[c], bc = b[c], mc = m[c], kk = with_k ? kc[c] : (F)0;
#define ROW(c, l)                                                                                              \
    o[(l) * C + (c)] = ST(EV_DX(kind, kept, LD(dd[(l) * C + (c)]), LD(p[(l) * C + (c)]), vc, cc, lim, Dc, Ec, ac, bc, \
                                mc, kk, with_k));
    ROW_STEPS(!kept, k, c0, C, PRE, ROW, NO_POST);
#undef PRE
#undef ROW
}

int S(nl_evonorm_dx_cl)(const T *dy, const T *x, T *dx, i64 N, i64 L, i64 C, int kind, const double *v,
                        const double *dstd, const double *istd, const double *a, const double *b, const double *m,
                        const double *k, const T *kept, int rowmask, int nt) {
    EV_LIMIT(lim);
    const double *src[6] = {dstd, istd, a, b, m, k};
    F *co = S(ev_coefs)(src, 6, N, C, rowmask, v);
    if (!co) return 1;
    const F *vr = co + 6 * N * C, *cr = vr + C;
#define SEG(n, l0, k)                                                                                          \
    {                                                                                                          \
        const i64 at = ((n) * L + (l0)) * C, rows = (k);                                                       \
        const F *D = co + (n) * C, *E = co + (N + (n)) * C, *ar = co + (2 * N + (n)) * C,                      \
                *br = co + (3 * N + (n)) * C, *mr = co + (4 * N + (n)) * C, *kr = co + (5 * N + (n)) * C;      \
        if (kept)                                                                                              \
            RUN(0, 1)                                                                                          \
        else                                                                                                   \
            EV_SWITCH(kind, UNKEPT);                                                                           \
    }
    const int st = !kept && EV_STREAMS(C, N * L * C); /* (kept: dx is read, in place) */
#define TO(o, j, kk)                                                                                           \
    S(ev_dx_run_cl)(K_, KEPT_, 1, dy + at + (j) * C, x + at + (j) * C, o, kk, C, vr, cr, lim, D, E, ar, br, mr, kr)
#define RUN(K, KEPT)                                                                                           \
    {                                                                                                          \
        const int K_ = K, KEPT_ = KEPT;                                                                        \
        EV_STREAMED_ROWS(st, dx + at, rows, C, TO);                                                            \
    }
#define UNKEPT(K) RUN(K, 0)
#pragma omp parallel num_threads(nt)
    {
        SAMPLE_RUNS(N, L, RUN_ROWS(C), SEG);
        stream_fence(st);
    }
#undef TO
#undef UNKEPT
#undef RUN
#undef SEG
    free(co);
    return 0;
}


#include "evos0_impl.h" /* S0 per sample from cache (uses the helpers above) */

#undef EV_TERMS
#undef EV_DX0
#undef EV_DX
#undef ROW_STEPS
#undef NO_POST
#undef EV_STREAMS
#undef EV_STREAMED_ROWS
#undef EV_CHUNK
