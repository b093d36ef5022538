/* EvoNorm-S0 per sample from cache (Liu et al., NeurIPS 2020): y = f(x) r gamma + beta, f(x) =
 * x sigmoid(v x), r = 1 / sqrt(var_g + eps) over the sample's group of C/G channels (see
 * evonorm_impl.h for f, its slope and the sums; the adjoint is EvoS0Stats's, in
 * normlab/engine/describe_modern.py). Included by evonorm_impl.h, for one storage type T.
 *
 *   evos0_fwd   per work item: the per-(n, c) moments (read x), the group's r, then y from cache
 *   evos0_bwd   per work item: the sums F = sum dy f(x), g = sum dy, Q = sum dy x^2 s (1 - s) with
 *               dy f'(x) kept in dx (read dy, x), the group's A = sum_c gamma_c F_c, then
 *               dx = gamma r (dy f'(x)) - (r^3 A / K) (x - mu_g) from cache (K values a group)
 *
 * 5T from memory a step instead of the generic passes' 8T (moments, output, sums, dx).
 * Channel-first work items are (sample, group) blocks of C/G * L contiguous values; channels-last
 * ones are samples (L * C values: 400 kB at (56 * 56, 64) in bfloat16, in L2). Callers use them
 * with at least two items a thread. Per-(n, c) mean and M2 (of each channel), the group centre
 * mu_g and r (per (n, c), repeated over the group) come back, double; sums (3, N, C) double. */

int S(nl_evos0_fwd_cf)(const T *x, T *y, i64 N, i64 C, i64 L, i64 G, double eps, const double *v,
                       const double *weight, const double *bias, double *mean, double *m2, double *ctr,
                       double *rstd_out, int nt) {
    EV_LIMIT(lim);
    i64 cpg = C / G;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 it = 0; it < N * G; it++) {
        i64 n = it / G, g = it % G, c0 = g * cpg, c1 = c0 + cpg;
        double gn = 0.0, gm = 0.0, gq = 0.0;
        for (i64 c = c0; c < c1; c++) {
            double na;
            S(row_moments)(x + (n * C + c) * L, L, &na, &mean[n * C + c], &m2[n * C + c]);
            merge(&gn, &gm, &gq, na, mean[n * C + c], m2[n * C + c]);
        }
        double rstd = 1.0 / sqrt(gq / gn + eps);
        for (i64 c = c0; c < c1; c++) {
            ctr[n * C + c] = gm, rstd_out[n * C + c] = rstd;
            const T *p = x + (n * C + c) * L;
            T *o = y + (n * C + c) * L;
            const F vc = (F)v[c], cc = (F)EV_COEF(v[c]), s = (F)(weight ? weight[c] * rstd : rstd),
                    b = (F)(bias ? bias[c] : 0.0);
            S(ev_fwd_row)(0, p, o, L, vc, cc, lim, 0, 0, s, b);
        }
    }
    return 0;
}

int S(nl_evos0_bwd_cf)(const T *dy, const T *x, T *dx, i64 N, i64 C, i64 L, i64 G, const double *v,
                       const double *weight, const double *ctr, const double *rstd, double *sums, int nt) {
    EV_LIMIT(lim);
    i64 cpg = C / G, NC = N * C;
    double K = (double)(cpg * L);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 it = 0; it < N * G; it++) {
        i64 n = it / G, c0 = (it % G) * cpg, c1 = c0 + cpg;
        double big_a = 0.0;
        for (i64 c = c0; c < c1; c++) {
            double acc[5] = {0};
            const F vc = (F)v[c], cc = (F)EV_COEF(v[c]);
            for (i64 i0 = 0; i0 < L; i0 += CF_CHUNK) {
                i64 at = (n * C + c) * L + i0;
                S(ev_run_red)(0, dy + at, x + at, MIN(CF_CHUNK, L - i0), vc, cc, lim, 0, 0, acc, dx + at);
            }
            for (int j = 0; j < 3; j++) sums[j * NC + n * C + c] = acc[j];
            big_a += (weight ? weight[c] : 1.0) * acc[0];
        }
        const double r = rstd[n * C + c0];
        const F b = (F)(-r * r * r * big_a / K), m = (F)ctr[n * C + c0];
        for (i64 c = c0; c < c1; c++) {
            const T *p = x + (n * C + c) * L;
            T *o = dx + (n * C + c) * L;
            const F a = (F)((weight ? weight[c] : 1.0) * r);
            S(ev_dx_row)(0, 1, 0, NULL, p, o, L, 0, 0, 0, 0, 0, a, b, m, 0); /* (kept dy f'(x) in o) */
        }
    }
    return 0;
}

int S(nl_evos0_fwd_cl)(const T *x, T *y, i64 N, i64 L, i64 C, i64 G, double eps, const double *v,
                       const double *weight, const double *bias, double *mean, double *m2, double *ctr,
                       double *rstd_out, int nt) {
    EV_LIMIT(lim);
    i64 cpg = C / G;
    int failed = 0;
#pragma omp parallel num_threads(nt)
    {
        /* one scratch a thread, per channel: a block's mean and M2, the sample's so far (double);
         * v, EV_COEF(v), scale, shift (F) */
        double *pm = malloc((sizeof(double) + sizeof(F)) * C * 4), *pq = pm + C, *ma = pm + 2 * C, *qa = pm + 3 * C;
        F *vr = (F *)(pm + 4 * C), *cr = vr + C, *cs = vr + 2 * C, *cb = vr + 3 * C;
        if (!pm) failed = 1;
        else
            for (i64 c = 0; c < C; c++) vr[c] = (F)v[c], cr[c] = (F)EV_COEF(v[c]), cb[c] = (F)(bias ? bias[c] : 0.0);
#pragma omp for schedule(static)
        for (i64 n = 0; n < N; n++) {
            if (!pm) continue;
            const T *xs = x + n * L * C;
            T *ys = y + n * L * C;
            double cnt = S(sample_moments_cl)(xs, L, C, pm, pq, ma, qa); /* every channel's count */
            for (i64 g = 0; g < G; g++) {
                double gn = 0.0, gm = 0.0, gq = 0.0;
                for (i64 c = g * cpg; c < (g + 1) * cpg; c++) merge(&gn, &gm, &gq, cnt, ma[c], qa[c]);
                double rstd = 1.0 / sqrt(gq / gn + eps);
                for (i64 c = g * cpg; c < (g + 1) * cpg; c++) {
                    ctr[n * C + c] = gm, rstd_out[n * C + c] = rstd;
                    mean[n * C + c] = ma[c], m2[n * C + c] = qa[c];
                    cs[c] = (F)(weight ? weight[c] * rstd : rstd);
                }
            }
            S(ev_fwd_run_cl)(0, xs, ys, L, C, vr, cr, lim, vr, vr, cs, cb); /* (S0: no D, E) */
        }
        free(pm);
    }
    return failed;
}

int S(nl_evos0_bwd_cl)(const T *dy, const T *x, T *dx, i64 N, i64 L, i64 C, i64 G, const double *v,
                       const double *weight, const double *ctr, const double *rstd, double *sums, int nt) {
    EV_LIMIT(lim);
    i64 cpg = C / G, R = rows_per_block(C, sizeof(T)), NC = N * C;
    double K = (double)(cpg * L);
    int failed = 0;
#pragma omp parallel num_threads(nt)
    {
        /* per channel: v, EV_COEF(v), a = gamma r, b, the centre; the sample's three sums; per group A
         * (ev_block_red reads no D, E for S0: vr stands in) */
        F *vr = malloc(sizeof(F) * C * 5), *cr = vr + C, *ca = vr + 2 * C, *cb = vr + 3 * C, *cm = vr + 4 * C;
        double *tot = malloc(sizeof(double) * (3 * C + G));
        if (!vr || !tot) failed = 1;
        else
            for (i64 c = 0; c < C; c++) vr[c] = (F)v[c], cr[c] = (F)EV_COEF(v[c]);
#pragma omp for schedule(static)
        for (i64 n = 0; n < N; n++) {
            if (!vr || !tot) continue;
            const T *ds = dy + n * L * C, *xs = x + n * L * C;
            T *os = dx + n * L * C;
            double *big_a = tot + 3 * C;
            for (i64 j = 0; j < 3 * C + G; j++) tot[j] = 0.0;
            for (i64 l0 = 0; l0 < L; l0 += R) {
                i64 k = MIN(R, L - l0);
                for (i64 c0 = 0; c0 < C; c0 += CB) {
                    A acc[5 * CB];
                    i64 w = MIN(CB, C - c0), at = l0 * C + c0;
                    S(ev_block_red)(0, ds + at, xs + at, k, C, w, vr + c0, cr + c0, lim, vr, vr, acc, os + at);
                    for (int j = 0; j < 3; j++)
                        for (i64 c = 0; c < w; c++) tot[j * C + c0 + c] += acc[j * CB + c];
                }
            }
            for (i64 c = 0; c < C; c++) {
                for (int j = 0; j < 3; j++) sums[j * NC + n * C + c] = tot[j * C + c];
                big_a[c / cpg] += (weight ? weight[c] : 1.0) * tot[c];
            }
            for (i64 c = 0; c < C; c++) {
                double r = rstd[n * C + c];
                ca[c] = (F)((weight ? weight[c] : 1.0) * r);
                cb[c] = (F)(-r * r * r * big_a[c / cpg] / K);
                cm[c] = (F)ctr[n * C + c];
            }
            S(ev_dx_run_cl)(0, 1, 0, NULL, xs, os, L, C, vr, cr, lim, vr, vr, ca, cb, cm, NULL); /* dy f'(x) kept in os */
        }
        free(vr);
        free(tot);
    }
    return failed;
}
