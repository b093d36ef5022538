/* EvoNorm-S0's element map (Liu et al., NeurIPS 2020) for one storage type T (arithmetic F,
 * accumulator A, channel block CB, names S(...), LD/ST, EP_SIGMOID as in kernels_impl.h, whose
 * S(coef_rows) it uses). Included by kernels.c once per type, after kernels_impl.h.
 *
 * With f(x) = x sigmoid(v_c x), s = sigmoid(v_c x) and per-(n, c) coefficients (double (N, C)):
 *
 *   evos0_fwd   y = f(x) * scale + shift                                   read x, write y   2T
 *   evos0_red   per (n, c): sum dy f(x), sum dy x^2 s (1 - s), sum dy      read dy, x        2T
 *   evos0_dx    dx = a * dy * f'(x) + b * (x - m),  f' = s + v x s (1 - s) read 2, write    3T
 *
 * (the group statistics come from the moments kernel; the adjoint is in
 * normlab/engine/describe_modern.py). Two layouts as the other kernels: (N, C, L) "cf" and
 * (N, L, C) "cl". Sums are accumulated in A over at most CF_CHUNK values of a channel-first row
 * or one block of channels-last rows (rows_per_block), then in double in a fixed order. */

/* ---- channel-first (N, C, L) ---- */

int S(nl_evos0_fwd_cf)(const T *x, T *y, i64 N, i64 C, i64 L, const double *v, const double *scale,
                       const double *shift, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * C; r++) {
        const T *p = x + r * L;
        T *o = y + r * L;
        const F vc = (F)v[r % C], s = (F)scale[r], b = (F)shift[r];
#pragma omp simd
        for (i64 i = 0; i < L; i++) {
            F xv = LD(p[i]);
            o[i] = ST(xv * EP_SIGMOID(vc * xv) * s + b);
        }
    }
    return 0;
}

int S(nl_evos0_red_cf)(const T *dy, const T *x, i64 N, i64 C, i64 L, const double *v, double *sf, double *sq,
                       double *sg, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * C; r++) {
        const T *d = dy + r * L, *p = x + r * L;
        const F vc = (F)v[r % C];
        double tf = 0.0, tq = 0.0, tg = 0.0;
        for (i64 i0 = 0; i0 < L; i0 += CF_CHUNK) {
            i64 k = MIN(CF_CHUNK, L - i0);
            A af = 0, aq = 0, ag = 0;
#pragma omp simd reduction(+ : af, aq, ag)
            for (i64 i = i0; i < i0 + k; i++) {
                F xv = LD(p[i]), dv = LD(d[i]), s = EP_SIGMOID(vc * xv);
                af += dv * xv * s;
                aq += dv * xv * xv * s * ((F)1 - s);
                ag += dv;
            }
            tf += af;
            tq += aq;
            tg += ag;
        }
        sf[r] = tf;
        sq[r] = tq;
        sg[r] = tg;
    }
    return 0;
}

int S(nl_evos0_dx_cf)(const T *dy, const T *x, T *dx, i64 N, i64 C, i64 L, const double *v, const double *a,
                      const double *b, const double *m, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * C; r++) {
        const T *d = dy + r * L, *p = x + r * L;
        T *o = dx + r * L;
        const F vc = (F)v[r % C], ar = (F)a[r], br = (F)b[r], mr = (F)m[r];
#pragma omp simd
        for (i64 i = 0; i < L; i++) {
            F xv = LD(p[i]), s = EP_SIGMOID(vc * xv);
            o[i] = ST(ar * LD(d[i]) * (s + vc * xv * s * ((F)1 - s)) + br * (xv - mr));
        }
    }
    return 0;
}

/* ---- channels-last (N, L, C): the element passes row by row with the sample's coefficients
 * as F rows; the reduction per (sample, block of rows), CB channels at a time ---- */

int S(nl_evos0_fwd_cl)(const T *x, T *y, i64 N, i64 L, i64 C, const double *v, const double *scale,
                       const double *shift, int nt) {
    const double *src[2] = {scale, shift};
    F *co = S(coef_rows)(src, 2, N * C);
    F *vr = malloc(sizeof(F) * C);
    if (!co || !vr) {
        free(co), free(vr);
        return 1;
    }
    for (i64 c = 0; c < C; c++) vr[c] = (F)v[c];
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * L; r++) {
        i64 n = r / L;
        const T *p = x + r * C;
        const F *s = co + n * C, *b = co + (N + n) * C;
        T *o = y + r * C;
#pragma omp simd
        for (i64 c = 0; c < C; c++) {
            F xv = LD(p[c]);
            o[c] = ST(xv * EP_SIGMOID(vr[c] * xv) * s[c] + b[c]);
        }
    }
    free(co), free(vr);
    return 0;
}

static inline __attribute__((always_inline)) void S(evos0_block_red)(const T *d0, const T *p0, i64 k, i64 C, i64 w,
                                                                     const F *vr, A *af, A *aq, A *ag) {
    for (i64 c = 0; c < w; c++) af[c] = aq[c] = ag[c] = 0;
    for (i64 l = 0; l < k; l++) {
        const T *d = d0 + l * C, *p = p0 + l * C;
#pragma omp simd
        for (i64 c = 0; c < w; c++) {
            F xv = LD(p[c]), dv = LD(d[c]), s = EP_SIGMOID(vr[c] * xv);
            af[c] += dv * xv * s;
            aq[c] += dv * xv * xv * s * ((F)1 - s);
            ag[c] += dv;
        }
    }
}

int S(nl_evos0_red_cl)(const T *dy, const T *x, i64 N, i64 L, i64 C, const double *v, double *sf, double *sq,
                       double *sg, int nt) {
    i64 R = rows_per_block(C, sizeof(T)), nb = (L + R - 1) / R;
    double *pf = malloc(sizeof(double) * N * nb * C * 3);
    F *vr = malloc(sizeof(F) * C);
    if (!pf || !vr) {
        free(pf), free(vr);
        return 1;
    }
    for (i64 c = 0; c < C; c++) vr[c] = (F)v[c];
    double *pq = pf + N * nb * C, *pg = pq + N * nb * C;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 it = 0; it < N * nb; it++) {
        i64 n = it / nb, l0 = (it % nb) * R, k = MIN(R, L - l0);
        for (i64 c0 = 0; c0 < C; c0 += CB) {
            A af[CB], aq[CB], ag[CB];
            i64 w = MIN(CB, C - c0), at = (n * L + l0) * C + c0;
            if (w == CB)
                S(evos0_block_red)(dy + at, x + at, k, C, CB, vr + c0, af, aq, ag);
            else
                S(evos0_block_red)(dy + at, x + at, k, C, w, vr + c0, af, aq, ag);
            for (i64 c = 0; c < w; c++) {
                pf[it * C + c0 + c] = af[c];
                pq[it * C + c0 + c] = aq[c];
                pg[it * C + c0 + c] = ag[c];
            }
        }
    }
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * C; r++) {
        i64 n = r / C, c = r % C;
        double tf = 0.0, tq = 0.0, tg = 0.0;
        for (i64 b = 0; b < nb; b++) {
            i64 at = (n * nb + b) * C + c;
            tf += pf[at];
            tq += pq[at];
            tg += pg[at];
        }
        sf[r] = tf;
        sq[r] = tq;
        sg[r] = tg;
    }
    free(pf), free(vr);
    return 0;
}

int S(nl_evos0_dx_cl)(const T *dy, const T *x, T *dx, i64 N, i64 L, i64 C, const double *v, const double *a,
                      const double *b, const double *m, int nt) {
    const double *src[3] = {a, b, m};
    F *co = S(coef_rows)(src, 3, N * C);
    F *vr = malloc(sizeof(F) * C);
    if (!co || !vr) {
        free(co), free(vr);
        return 1;
    }
    for (i64 c = 0; c < C; c++) vr[c] = (F)v[c];
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * L; r++) {
        i64 n = r / L;
        const T *d = dy + r * C, *p = x + r * C;
        const F *ar = co + n * C, *br = co + (N + n) * C, *mr = co + (2 * N + n) * C;
        T *o = dx + r * C;
#pragma omp simd
        for (i64 c = 0; c < C; c++) {
            F xv = LD(p[c]), s = EP_SIGMOID(vr[c] * xv);
            o[c] = ST(ar[c] * LD(d[c]) * (s + vr[c] * xv * s * ((F)1 - s)) + br[c] * (xv - mr[c]));
        }
    }
    free(co), free(vr);
    return 0;
}

/* ---- EvoNorm-B0: y = x u * scale + shift, u = 1 / max(D, v x + E), with per-(n, c) D (the
 * batch or running std) and E (the instance std). Left branch: D >= v x + E.
 *
 *   evob0_fwd   y = x u * scale + shift                                       2T
 *   evob0_red   per (n, c): sum dy x u, sum dy, sum_left dy x u^2,
 *               sum_right dy x u^2, sum_right dy x^2 u^2                      2T
 *   evob0_dx    dx = a dy (left: u; right: E u^2) + b (x - m) + k             3T ---- */

#define B0_U(xv, vc, D, E, left, u)                                                                            \
    F r_ = (vc) * (xv) + (E);                                                                                  \
    F left = (D) >= r_ ? (F)1 : (F)0;                                                                          \
    F u = (F)1 / ((D) >= r_ ? (D) : r_);

int S(nl_evob0_fwd_cf)(const T *x, T *y, i64 N, i64 C, i64 L, const double *v, const double *dstd,
                       const double *istd, const double *scale, const double *shift, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * C; r++) {
        const T *p = x + r * L;
        T *o = y + r * L;
        const F vc = (F)v[r % C], D = (F)dstd[r], E = (F)istd[r], s = (F)scale[r], b = (F)shift[r];
#pragma omp simd
        for (i64 i = 0; i < L; i++) {
            F xv = LD(p[i]);
            B0_U(xv, vc, D, E, left, u)
            (void)left;
            o[i] = ST(xv * u * s + b);
        }
    }
    return 0;
}

/* the five sums of one run of k values into acc[0..4] */
static inline __attribute__((always_inline)) void S(evob0_run_red)(const T *d, const T *p, i64 k, F vc, F D, F E,
                                                                   double *acc) {
    A a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4)
    for (i64 i = 0; i < k; i++) {
        F xv = LD(p[i]), dv = LD(d[i]);
        B0_U(xv, vc, D, E, left, u)
        F t = dv * xv * u * u;
        a0 += dv * xv * u;
        a1 += dv;
        a2 += left * t;
        a3 += ((F)1 - left) * t;
        a4 += ((F)1 - left) * t * xv;
    }
    acc[0] += a0, acc[1] += a1, acc[2] += a2, acc[3] += a3, acc[4] += a4;
}

/* sums: five (N, C) arrays, one after the other */
int S(nl_evob0_red_cf)(const T *dy, const T *x, i64 N, i64 C, i64 L, const double *v, const double *dstd,
                       const double *istd, double *sums, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * C; r++) {
        double acc[5] = {0};
        for (i64 i0 = 0; i0 < L; i0 += CF_CHUNK)
            S(evob0_run_red)(dy + r * L + i0, x + r * L + i0, MIN(CF_CHUNK, L - i0), (F)v[r % C], (F)dstd[r],
                             (F)istd[r], acc);
        for (int j = 0; j < 5; j++) sums[j * N * C + r] = acc[j];
    }
    return 0;
}

int S(nl_evob0_dx_cf)(const T *dy, const T *x, T *dx, i64 N, i64 C, i64 L, const double *v, const double *dstd,
                      const double *istd, const double *a, const double *b, const double *m, const double *k,
                      int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * C; r++) {
        const T *d = dy + r * L, *p = x + r * L;
        T *o = dx + r * L;
        const F vc = (F)v[r % C], D = (F)dstd[r], E = (F)istd[r], ar = (F)a[r], br = (F)b[r], mr = (F)m[r],
                kr = (F)k[r];
#pragma omp simd
        for (i64 i = 0; i < L; i++) {
            F xv = LD(p[i]);
            B0_U(xv, vc, D, E, left, u)
            F mf = left * u + ((F)1 - left) * E * u * u;
            o[i] = ST(ar * LD(d[i]) * mf + br * (xv - mr) + kr);
        }
    }
    return 0;
}

int S(nl_evob0_fwd_cl)(const T *x, T *y, i64 N, i64 L, i64 C, const double *v, const double *dstd,
                       const double *istd, const double *scale, const double *shift, int nt) {
    const double *src[4] = {dstd, istd, scale, shift};
    F *co = S(coef_rows)(src, 4, N * C);
    F *vr = malloc(sizeof(F) * C);
    if (!co || !vr) {
        free(co), free(vr);
        return 1;
    }
    for (i64 c = 0; c < C; c++) vr[c] = (F)v[c];
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * L; r++) {
        i64 n = r / L;
        const T *p = x + r * C;
        const F *D = co + n * C, *E = co + (N + n) * C, *s = co + (2 * N + n) * C, *b = co + (3 * N + n) * C;
        T *o = y + r * C;
#pragma omp simd
        for (i64 c = 0; c < C; c++) {
            F xv = LD(p[c]);
            B0_U(xv, vr[c], D[c], E[c], left, u)
            (void)left;
            o[c] = ST(xv * u * s[c] + b[c]);
        }
    }
    free(co), free(vr);
    return 0;
}

static inline __attribute__((always_inline)) void S(evob0_block_red)(const T *d0, const T *p0, i64 k, i64 C, i64 w,
                                                                     const F *vr, const F *D, const F *E, A *acc) {
    for (i64 c = 0; c < 5 * CB; c++) acc[c] = 0;
    A *a0 = acc, *a1 = acc + CB, *a2 = acc + 2 * CB, *a3 = acc + 3 * CB, *a4 = acc + 4 * CB;
    for (i64 l = 0; l < k; l++) {
        const T *d = d0 + l * C, *p = p0 + l * C;
#pragma omp simd
        for (i64 c = 0; c < w; c++) {
            F xv = LD(p[c]), dv = LD(d[c]);
            B0_U(xv, vr[c], D[c], E[c], left, u)
            F t = dv * xv * u * u;
            a0[c] += dv * xv * u;
            a1[c] += dv;
            a2[c] += left * t;
            a3[c] += ((F)1 - left) * t;
            a4[c] += ((F)1 - left) * t * xv;
        }
    }
}

int S(nl_evob0_red_cl)(const T *dy, const T *x, i64 N, i64 L, i64 C, const double *v, const double *dstd,
                       const double *istd, double *sums, int nt) {
    i64 R = rows_per_block(C, sizeof(T)), nb = (L + R - 1) / R, NC = N * C;
    const double *src[2] = {dstd, istd};
    F *co = S(coef_rows)(src, 2, NC);
    double *part = malloc(sizeof(double) * N * nb * C * 5);
    F *vr = malloc(sizeof(F) * C);
    if (!co || !part || !vr) {
        free(co), free(part), free(vr);
        return 1;
    }
    for (i64 c = 0; c < C; c++) vr[c] = (F)v[c];
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 it = 0; it < N * nb; it++) {
        i64 n = it / nb, l0 = (it % nb) * R, k = MIN(R, L - l0);
        for (i64 c0 = 0; c0 < C; c0 += CB) {
            A acc[5 * CB];
            i64 w = MIN(CB, C - c0), at = (n * L + l0) * C + c0;
            const F *D = co + n * C + c0, *E = co + NC + n * C + c0;
            if (w == CB)
                S(evob0_block_red)(dy + at, x + at, k, C, CB, vr + c0, D, E, acc);
            else
                S(evob0_block_red)(dy + at, x + at, k, C, w, vr + c0, D, E, acc);
            for (int j = 0; j < 5; j++)
                for (i64 c = 0; c < w; c++) part[(j * N * nb + it) * C + c0 + c] = acc[j * CB + c];
        }
    }
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < NC; r++) {
        i64 n = r / C, c = r % C;
        for (int j = 0; j < 5; j++) {
            double t = 0.0;
            for (i64 b = 0; b < nb; b++) t += part[(j * N * nb + n * nb + b) * C + c];
            sums[j * NC + r] = t;
        }
    }
    free(co), free(part), free(vr);
    return 0;
}

int S(nl_evob0_dx_cl)(const T *dy, const T *x, T *dx, i64 N, i64 L, i64 C, const double *v, const double *dstd,
                      const double *istd, const double *a, const double *b, const double *m, const double *k,
                      int nt) {
    const double *src[6] = {dstd, istd, a, b, m, k};
    F *co = S(coef_rows)(src, 6, N * C);
    F *vr = malloc(sizeof(F) * C);
    if (!co || !vr) {
        free(co), free(vr);
        return 1;
    }
    for (i64 c = 0; c < C; c++) vr[c] = (F)v[c];
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < N * L; r++) {
        i64 n = r / L;
        const T *d = dy + r * C, *p = x + r * C;
        const F *D = co + n * C, *E = co + (N + n) * C, *ar = co + (2 * N + n) * C, *br = co + (3 * N + n) * C,
                *mr = co + (4 * N + n) * C, *kr = co + (5 * N + n) * C;
        T *o = dx + r * C;
#pragma omp simd
        for (i64 c = 0; c < C; c++) {
            F xv = LD(p[c]);
            B0_U(xv, vr[c], D[c], E[c], left, u)
            F mf = left * u + ((F)1 - left) * E[c] * u * u;
            o[c] = ST(ar[c] * LD(d[c]) * mf + br[c] * (xv - mr[c]) + kr[c]);
        }
    }
    free(co), free(vr);
    return 0;
}

#undef B0_U
