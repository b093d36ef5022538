/* The element-wise normalization-free norms, Dynamic Tanh and Dynamic erf, for one storage type
 * T (arithmetic F, accumulator A, names S(...), LD/ST as in kernels_impl.h; EP_TANH, EP_ERF,
 * EP_GAUSS, EP_EXPA and EP_EXP name the float or double functions of mathfn.h, kernels.c choosing
 * them per type). Included by kernels.c once per type.
 *
 *   forward   y = w_c f(z) + b_c,  z = alpha x + s,  f = tanh (kind 0) or erf (kind 1)
 *             read x, write y
 *   backward  g = dy w_c f'(z);  dx = alpha g                            read dy, x, write dx
 *             and in the same pass: per channel sum dy f(z) (dweight) and sum dy (dbias);
 *             over everything sum g x (dalpha) and sum g (dshift)
 *
 * w and b may be NULL (1 and 0). Two layouts: rows of an (M, C) matrix, the channel axis last
 * ("cl"), and (N, C, L), channel-first ("cf"). Sums are accumulated in A over at most MAX_ROWS
 * rows (CF_CHUNK values of a channel-first row), then in double; the partial sums are
 * added in a fixed order, so the results depend only on the shape and the thread count.
 */

#define EW_TWO_OVER_SQRT_PI 1.1283791670955126

/* f(z) and, with fd, f'(z); kind is a constant after inlining, so each loop has one f */
static inline __attribute__((always_inline)) F S(ew_f)(F z, const int kind) {
    return kind ? EP_ERF(z) : EP_TANH(z);
}

static inline __attribute__((always_inline)) F S(ew_fd)(F z, const int kind, F *fd) {
    if (kind) {
        *fd = (F)EW_TWO_OVER_SQRT_PI * EP_GAUSS(z);
        return EP_ERF(z);
    }
    F t = EP_TANH(z);
    *fd = 1 - t * t;
    return t;
}

/* w and b as F vectors of length C (1 and 0 where absent); NULL if out of memory */
static F *S(ew_affine)(const double *weight, const double *bias, i64 C) {
    F *w = malloc(sizeof(F) * C * 2);
    if (w)
        for (i64 c = 0; c < C; c++) {
            w[c] = (F)(weight ? weight[c] : 1.0);
            w[C + c] = (F)(bias ? bias[c] : 0.0);
        }
    return w;
}

/* ---- forward ---- */

static inline __attribute__((always_inline)) void S(ew_fwd_row)(const T *p, T *o, i64 C, F a, F s, const F *w,
                                                                const F *b, const int kind) {
    i64 c = 0;
#if F16C_CHUNKS /* (eight values a conversion each way: kernels_impl.h's ROW_OUT) */
    for (; c + 8 <= C; c += 8) {
        float xb[8], ob[8];
        S(chunk_in)(xb, p + c, 8);
#pragma omp simd
        for (int j = 0; j < 8; j++) ob[j] = w[c + j] * S(ew_f)(a * xb[j] + s, kind) + b[c + j];
        S(chunk_out)(o + c, ob, 8);
    }
#endif
#pragma omp simd
    for (i64 j = c; j < C; j++) o[j] = ST(w[j] * S(ew_f)(a * LD(p[j]) + s, kind) + b[j]);
}

static inline __attribute__((always_inline)) void S(ew_fwd_run)(const T *p, T *o, i64 L, F a, F s, F w, F b,
                                                                const int kind) {
#define SQF(_, v, K) (w * S(ew_f)(a * (v) + s, K) + b)
    ROW_OUT(o, p, p, L, SQF, kind);
#undef SQF
}

int S(nl_squash_fwd_cl)(const T *x, T *y, i64 M, i64 C, int kind, double alpha, double shift, const double *weight,
                        const double *bias, int nt) {
    F *w = S(ew_affine)(weight, bias, C);
    if (!w) return 1;
    const F a = (F)alpha, s = (F)shift, *b = w + C;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < M; r++) {
        if (kind)
            S(ew_fwd_row)(x + r * C, y + r * C, C, a, s, w, b, 1);
        else
            S(ew_fwd_row)(x + r * C, y + r * C, C, a, s, w, b, 0);
    }
    free(w);
    return 0;
}

int S(nl_squash_fwd_cf)(const T *x, T *y, i64 N, i64 C, i64 L, int kind, double alpha, double shift,
                        const double *weight, const double *bias, int nt) {
    F *w = S(ew_affine)(weight, bias, C);
    if (!w) return 1;
    const F a = (F)alpha, s = (F)shift;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * C; r++) {
        i64 c = r % C;
        if (kind)
            S(ew_fwd_run)(x + r * L, y + r * L, L, a, s, w[c], w[C + c], 1);
        else
            S(ew_fwd_run)(x + r * L, y + r * L, L, a, s, w[c], w[C + c], 0);
    }
    free(w);
    return 0;
}

/* ---- backward ---- */

/* one value's input gradient, stored by OUT(v) (a macro: OUT_F into the float chunk ob, OUT_T
 * into o rounded to T, at j), and its four terms dy f, dy, g x, g added to S0..S3; wv is its
 * channel's weight */
#define EW_TERMS(xv_, dv_, wv, OUT, S0, S1, S2, S3)                                                            \
    {                                                                                                          \
        F xv = (xv_), dv = (dv_), fd;                                                                          \
        F f = S(ew_fd)(a * xv + s, kind, &fd);                                                                 \
        F g = dv * (wv) * fd;                                                                                  \
        OUT(a * g);                                                                                            \
        S0 += dv * f;                                                                                          \
        S1 += dv;                                                                                              \
        S2 += g * xv;                                                                                          \
        S3 += g;                                                                                               \
    }
#define OUT_F(v) ob[j] = (v)
#define OUT_T(v) o[j] = ST(v)

/* one row of C channels: dx, and per channel the sums dy f (fw), dy (fb), g x (gx) and g (gs),
 * added up over the rows before the scalars' two are summed over the channels (ew_flush): one
 * row's g x and g reduced across the vector at the end of each row cost more than the row's
 * arithmetic where rows are short. Measured one thread from cache over per-row reductions:
 * C = 64 bfloat16 0.66, float32 0.74; C = 128 0.82-0.85; C = 256 0.93-0.95; C = 768 0.97-1.02. */
static inline __attribute__((always_inline)) void S(ew_bwd_row)(const T *d, const T *p, T *o, i64 C, F a, F s,
                                                                const F *w, A *fw, A *fb, A *gx, A *gs,
                                                                const int kind) {
    i64 c = 0;
#if F16C_CHUNKS /* (eight values a conversion each way) */
    for (; c + 8 <= C; c += 8) {
        float xb[8], db[8], ob[8];
        S(chunk_in)(xb, p + c, 8);
        S(chunk_in)(db, d + c, 8);
#pragma omp simd
        for (int j = 0; j < 8; j++) EW_TERMS(xb[j], db[j], w[c + j], OUT_F, fw[c + j], fb[c + j], gx[c + j], gs[c + j])
        S(chunk_out)(o + c, ob, 8);
    }
#endif
#pragma omp simd
    for (i64 j = c; j < C; j++) EW_TERMS(LD(p[j]), LD(d[j]), w[j], OUT_T, fw[j], fb[j], gx[j], gs[j])
}

/* one channel-first run of L <= CF_CHUNK values: dx, and its four sums added to out[0..3]
 * (dy f, dy, g x, g) */
static inline __attribute__((always_inline)) void S(ew_bwd_run)(const T *d, const T *p, T *o, i64 L, F a, F s, F w,
                                                                double *out, const int kind) {
    A sf = 0, sb = 0, gx = 0, gs = 0;
    i64 i = 0;
#if F16C_CHUNKS /* (eight values a conversion each way, the sums lane by lane: kernels_impl.h's row_sum) */
    {
        A l0[8] = {0}, l1[8] = {0}, l2[8] = {0}, l3[8] = {0};
        for (; i + 8 <= L; i += 8) {
            float xb[8], db[8], ob[8];
            S(chunk_in)(xb, p + i, 8);
            S(chunk_in)(db, d + i, 8);
#pragma omp simd
            for (int j = 0; j < 8; j++) EW_TERMS(xb[j], db[j], w, OUT_F, l0[j], l1[j], l2[j], l3[j])
            S(chunk_out)(o + i, ob, 8);
        }
        for (int j = 0; j < 8; j++) sf += l0[j], sb += l1[j], gx += l2[j], gs += l3[j];
    }
#endif
#pragma omp simd reduction(+ : sf, sb, gx, gs)
    for (i64 j = i; j < L; j++) EW_TERMS(LD(p[j]), LD(d[j]), w, OUT_T, sf, sb, gx, gs)
    out[0] += sf;
    out[1] += sb;
    out[2] += gx;
    out[3] += gs;
}
#undef EW_TERMS
#undef OUT_F
#undef OUT_T

/* the accumulated sums into the thread's double ones (2 C per-channel, 2 scalars), and zeroed */
static void S(ew_flush)(A *acc, double *mine, i64 C) {
    double tx = 0.0, ts = 0.0;
    for (i64 c = 0; c < 2 * C; c++) mine[c] += acc[c];
    for (i64 c = 0; c < C; c++) {
        tx += acc[2 * C + c];
        ts += acc[3 * C + c];
    }
    mine[2 * C] += tx;
    mine[2 * C + 1] += ts;
    for (i64 c = 0; c < 4 * C; c++) acc[c] = 0;
}

/* dw, db: per channel (C); dscal: {sum g x, sum g}. Per-thread partial sums (static schedule,
 * rows in order), added in thread order. */
int S(nl_squash_bwd_cl)(const T *dy, const T *x, T *dx, i64 M, i64 C, int kind, double alpha, double shift,
                        const double *weight, double *dw, double *db, double *dscal, int nt) {
    F *w = S(ew_affine)(weight, NULL, C);
    double *part = calloc((size_t)nt * (2 * C + 2), sizeof(double));
    if (!w || !part) {
        free(w);
        free(part);
        return 1;
    }
    const F a = (F)alpha, s = (F)shift;
    int failed = 0;
#pragma omp parallel num_threads(nt)
    {
        double *mine = part + (i64)omp_get_thread_num() * (2 * C + 2);
        A *acc = calloc((size_t)C * 4, sizeof(A)); /* dy f, dy, g x, g over up to MAX_ROWS rows */
        i64 pending = 0;
        if (!acc) failed = 1;
#pragma omp for schedule(static)
        for (i64 r = 0; r < M; r++) {
            if (!acc) continue;
            const i64 at = r * C;
            if (kind)
                S(ew_bwd_row)(dy + at, x + at, dx + at, C, a, s, w, acc, acc + C, acc + 2 * C, acc + 3 * C, 1);
            else
                S(ew_bwd_row)(dy + at, x + at, dx + at, C, a, s, w, acc, acc + C, acc + 2 * C, acc + 3 * C, 0);
            if (++pending == MAX_ROWS) {
                S(ew_flush)(acc, mine, C);
                pending = 0;
            }
        }
        if (acc) S(ew_flush)(acc, mine, C);
        free(acc);
    }
    for (i64 j = 0; j < 2 * C + 2; j++) {
        double t = 0.0;
        for (int th = 0; th < nt; th++) t += part[(i64)th * (2 * C + 2) + j];
        if (j < C)
            dw[j] = t;
        else if (j < 2 * C)
            db[j - C] = t;
        else
            dscal[j - 2 * C] = t;
    }
    free(w);
    free(part);
    return failed;
}

/* The same, channel-first: the four sums per (n, c) row (in double, chunk by chunk), then
 * added over n per channel and over every row for the scalars, in index order. */
int S(nl_squash_bwd_cf)(const T *dy, const T *x, T *dx, i64 N, i64 C, i64 L, int kind, double alpha, double shift,
                        const double *weight, double *dw, double *db, double *dscal, int nt) {
    F *w = S(ew_affine)(weight, NULL, C);
    double *rows = calloc((size_t)N * C * 4, sizeof(double));
    if (!w || !rows) {
        free(w);
        free(rows);
        return 1;
    }
    const F a = (F)alpha, s = (F)shift;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * C; r++) {
        const F wc = w[r % C];
        for (i64 s0 = 0; s0 < L; s0 += CF_CHUNK) {
            i64 k = MIN(CF_CHUNK, L - s0), at = r * L + s0;
            if (kind)
                S(ew_bwd_run)(dy + at, x + at, dx + at, k, a, s, wc, rows + 4 * r, 1);
            else
                S(ew_bwd_run)(dy + at, x + at, dx + at, k, a, s, wc, rows + 4 * r, 0);
        }
    }
    dscal[0] = dscal[1] = 0.0;
    for (i64 c = 0; c < C; c++) dw[c] = db[c] = 0.0;
    for (i64 r = 0; r < N * C; r++) {
        dw[r % C] += rows[4 * r];
        db[r % C] += rows[4 * r + 1];
        dscal[0] += rows[4 * r + 2];
        dscal[1] += rows[4 * r + 3];
    }
    free(w);
    free(rows);
    return 0;
}

/* y = f(x) for f = exp (0), tanh (1), erf (2), sigmoid (3), the activations' exp (4), the
 * epilogue's GELU (5) and its derivative (6), the half types' GELU (7) and derivative (8), tanh
 * (9) and erf (10) in the unit's type (float32: unrounded; in the half types' units 1 and 2 are
 * 9 and 10): the math functions alone (in the same vectorised loops as the kernels), for
 * tests */
#define EW_MAP(fn)                                                                                             \
    _Pragma("omp simd") for (i64 i = 0; i < n; i++) y[i] = ST(fn(LD(x[i])))
void S(nl_mathfn)(const T *x, T *y, i64 n, int which) {
    if (which == 0)
        EW_MAP(EP_EXP);
    else if (which == 1)
        EW_MAP(EP_TANH);
    else if (which == 2)
        EW_MAP(EP_ERF);
    else if (which == 3)
        EW_MAP(EP_SIGMOID);
    else if (which == 4)
        EW_MAP(EP_EXPA);
    else if (which == 5)
        EW_MAP(EP_GELU);
    else if (which == 6)
        EW_MAP(EP_GELU_GRAD);
    else if (which == 7)
        EW_MAP(nl_gelu_half);
    else if (which == 8)
        EW_MAP(nl_gelu_grad_half);
    else if (which == 9)
        EW_MAP(nl_tanhf_half);
    else
        EW_MAP(nl_erff_half);
}
#undef EW_MAP
