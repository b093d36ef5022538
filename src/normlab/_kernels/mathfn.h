/* Branch-free float32 exp, tanh, erf and sigmoid that GCC vectorises inside `#pragma omp simd`
 * loops (no libm calls, no tables, no branches: clamps and selects only). For the element-wise
 * norms (Dynamic Tanh, Dynamic erf) and the activation epilogues (silu, gelu) of the kernels.
 *
 *   nl_expf      exp(x) = 2^k exp(r), k = nearest integer to x / ln 2, r = x - k ln 2 (two-part
 *                ln 2, |r| <= ln2/2), exp(r) = 1 + r + r^2 P(r) with P of degree 4; 2^k built in
 *                the exponent bits, as two factors so that results down to the subnormals and
 *                up to overflow are right. x clamped to [-104, 88.75] (0 and inf beyond).
 *   nl_tanhf     x P(x^2) / Q(x^2), P of degree 4, Q of degree 5 (all of Q's coefficients
 *                positive: no pole), fitted on [0, 9]; x clamped to [-9.2, 9.2] (float32
 *                tanh is +-1 from 9.01 on).
 *   nl_erff      the same form with degrees 5 and 5, x clamped to [-3.92, 3.92].
 *   nl_tanhf_half, nl_erff_half  the same form for the half types (results rounded to bfloat16
 *                or float16): degrees 3 and 4 fitted on [0, 9.2] (tanh, 4.5e-7 relative), 3 and 3
 *                on [0, 3.5] (erf, 5.3e-6), clamped at 9.2 and 3.5.
 *   nl_gauss_half  exp(-z^2) for the half types, as 2^(-(z sqrt(log2 e))^2) (nl_exp2_half).
 *   nl_sigmoidf  1 / (1 + exp(-x)).
 *   nl_expf_act  nl_expf's polynomial on the range [-86, 88] only, 2^k added to the exponent
 *                bits in one integer add (no subnormal or overflow handling: 10 fewer
 *                operations): for the activation epilogues (SiLU, GELU), whose results do not
 *                depend on exp beyond that range.
 *   nl_expf_half the same for the half-precision types' epilogues: ln 2 in one part and a
 *                degree-4 polynomial (1.6e-5 relative: 0.02 of a float16 ulp, under a
 *                thousandth of a bfloat16 one), three operations fewer; fused SiLU in
 *                bfloat16, which is bound by this arithmetic, took 0.84 of norm then SiLU
 *                instead of 0.90 (mean of five pairs, two runs each, 2 threads).
 *   nl_gelu_half, nl_gelu_grad_half  the exact GELU v Phi(v) and its derivative
 *                Phi(v) + v phi(v) for the half-precision types' epilogues, with no erf, no
 *                division and one exp2: with t = |v| and Q = Phi(-t) = 2^P(t) (P of degree
 *                7, the normal's lower tail in relative terms), GELU(v) = max(v, 0) - t Q and
 *                GELU'(v) = Q K(t) for v < 0, 1 - Q K(t) for v >= 0 (K(t) = (t0 - t) R(t),
 *                R of degree 5), t clamped to 12.5. Fitted on |v| <= 6 (beyond it
 *                |GELU| < 6e-9, where torch's float32 GELU gives 0): relative errors below
 *                1e-4, for a value then rounded to bfloat16 or float16.
 *
 * The coefficients are near-minimax fits of the relative error in float64
 * (benchmarks/fit_mathfn.py); the float32 errors against float64 torch are measured by
 * tests/test_mathfn.py. NaN in gives NaN out; +-inf and +-0 give the function's limits (tanh
 * and erf keep the sign of zero; nl_gelu_half gives +0 at -0 and at -inf its value at -12.5,
 * -4e-36). With FMA hardware the polynomials use fused multiply-adds.
 *
 * Double precision calls libm (exact to the last bit or so, and float64 inputs are rare):
 * nl_exp, nl_tanh, nl_erf, nl_sigmoid, so that a kernel written once per element type can
 * name either set through a macro.
 */
#ifndef NORMLAB_MATHFN_H
#define NORMLAB_MATHFN_H

#include <math.h>
#include <stdint.h>

#if defined(__FMA__)
#define NL_FMA(a, b, c) fmaf(a, b, c)
#else
#define NL_FMA(a, b, c) ((a) * (b) + (c))
#endif

typedef union {
    uint32_t u;
    int32_t i;
    float f;
} nl_bits;

/* The clamp bounds of the activation epilogues, EvoNorm-S0's sigmoid and the float32 erf, tanh
 * and exp: the exps' range [-86, 88] (nl_expf_act, nl_expf_half), GELU's largest |v|, 12.5
 * (nl_gelu_t), the S0 sigmoid's |t| limit, 125 (evonorm_impl.h: EV_LIMIT), erf's and tanh's
 * largest |x|, 3.92 and 9.2, their results' 1 (nl_erff, nl_tanhf), and nl_expf's range
 * [-104, 88.75], read from memory rather than written as literals: with literal bounds GCC 12
 * if-converts the clamps of a vectorised loop into masked copies of the code after them for each
 * bound (the constant propagated into them), about 25 instructions per 32 values more than one
 * vmaxps and one vminps. A weak definition may be replaced at link time, so the compiler cannot
 * fold it; hidden, so nothing outside the library can. By index: 0-1 the exps' range, 2 GELU's
 * |v|, 3 S0's |t|, 4 erf's |x|, 5 tanh's |x|, 6 their results' bound, 7-8 nl_expf's range, 9 the
 * half types' erf's |x|.
 * The exp loop alone: bfloat16 0.50 -> 0.37 ns/value, float32 0.37 -> 0.24 (one thread).
 * erf's, tanh's and exp's literal bounds had left masked copies (a masked division among them)
 * in every float32 GELU epilogue and Dynamic erf/tanh pass, and in the bfloat16 Dynamic
 * erf/tanh ones; read from here, a layer's step, paired (two threads): float32 norm + GELU
 * 0.86-0.90x, dyt 0.76-0.77x, derf 0.83x then 0.92x (exp); bfloat16 dyt 0.79x, derf 0.81x then
 * 0.96x. */
__attribute__((weak, visibility("hidden"))) const float nl_act_bounds[10] = {-86.0f, 88.0f, 12.5f,   125.0f, 3.92f,
                                                                             9.2f,   1.0f,  -104.0f, 88.75f, 3.5f};

/* x limited to [lo, hi]; NaN stays NaN (both comparisons are false) */
static inline float nl_clampf(float x, float lo, float hi) {
    x = x < lo ? lo : x;
    return x > hi ? hi : x;
}

/* 2^k for integer k in [-126, 127], from the exponent bits */
static inline float nl_pow2i(int32_t k) {
    nl_bits b;
    b.i = (k + 127) << 23;
    return b.f;
}

/* x = k ln 2 + r, k the nearest integer to x / ln 2 (rintf: one vroundps), returned in *kf as a
 * float: ln 2 in two parts (the high part exact times any such k), or in one where a relative
 * error of 1e-5 in r is below the result's precision (the half types).
 *
 * Why rintf, and the polynomials below in Estrin's form (r^2 and pairs of coefficients at once)
 * rather than Horner's: a shorter chain of dependent operations per value for about the same
 * operations (vroundps where adding and subtracting 1.5 2^23 is two dependent adds; two FMA
 * latencies after r^2 where Horner's form is four), in loops that a sigmoid or exp a value keeps
 * from reaching the memory limit. Measured
 * one thread, (4, 64, 3136) from cache, paired against Horner's form with the added constant:
 * EvoNorm-S0's forward 0.95-0.96x and its sums pass 0.93-0.97x (float32 and bfloat16), float32
 * fused SiLU's sums pass 0.97x; a bfloat16 `evos0:32` layer step 0.97x (two threads). */
static inline float nl_exp_reduce(float x, float *kf, int two_part) {
    *kf = __builtin_rintf(x * 1.44269504f); /* (one vroundps) */
    if (!two_part) return NL_FMA(*kf, -0.693147182f, x);
    float r = NL_FMA(*kf, -0.693145752f, x);
    return NL_FMA(*kf, -1.42860677e-06f, r);
}

/* exp(r) on |r| <= ln2 / 2 as 1 + r + r^2 P(r), P of degree 4 */
static inline float nl_exp_poly(float r) {
    float r2 = r * r, lo = NL_FMA(0.166665211f, r, 0.49999994f), mid = NL_FMA(0.00836871006f, r, 0.041668389f);
    float p = NL_FMA(NL_FMA(0.00138146128f, r2, mid), r2, lo);
    return NL_FMA(p, r2, r) + 1.0f;
}

/* e 2^k where the result is a normal float: k added to the exponent bits */
static inline float nl_scale_normal(float e, float kf) {
    nl_bits b;
    b.f = e;
    b.u += (uint32_t)(int32_t)kf << 23;
    return b.f;
}

static inline float nl_expf(float x) {
    float kf, r = nl_exp_reduce(nl_clampf(x, nl_act_bounds[7], nl_act_bounds[8]), &kf, 1);
    int32_t k = (int32_t)kf, k1 = k / 2; /* two factors: 2^k may lie outside the normal range */
    return nl_exp_poly(r) * nl_pow2i(k1) * nl_pow2i(k - k1);
}

static inline float nl_expf_act(float x) {
    float kf, r = nl_exp_reduce(nl_clampf(x, nl_act_bounds[0], nl_act_bounds[1]), &kf, 1); /* the result stays normal */
    return nl_scale_normal(nl_exp_poly(r), kf);
}

static inline float nl_expf_half(float x) {
    float kf, r = nl_exp_reduce(nl_clampf(x, nl_act_bounds[0], nl_act_bounds[1]), &kf, 0);
    float p = NL_FMA(0.0398786701f, r, 0.167361051f); /* P of degree 2 */
    p = NL_FMA(p, r, 0.500155461f);
    return nl_scale_normal(NL_FMA(p, r * r, r) + 1.0f, kf);
}

/* 2^x for |x| <= 125 (the result a normal float) as 2^k 2^r: k the nearest integer to x (rintf)
 * added to the exponent bits, r = x - k on |r| <= 1/2 (nl_exp2_reduce, nl_exp2_scale);
 * 2^r = 1 + r P(r), evaluated in Estrin's form (see nl_exp_reduce). Two fits of P: degree 4
 * for float32 (nl_exp2f, 1.9e-7 relative), degree 3 for values then rounded to a half type
 * (nl_exp2_half, 4e-6; 0.003 of a float16 ulp) */
static inline float nl_exp2_reduce(float x, uint32_t *k) {
    float kf = __builtin_rintf(x);
    *k = (uint32_t)(int32_t)kf << 23;
    return x - kf;
}

static inline float nl_exp2_scale(float e, uint32_t k) {
    nl_bits b;
    b.f = e;
    b.u += k;
    return b.f;
}

static inline float nl_exp2f(float x) {
    uint32_t k;
    float r = nl_exp2_reduce(x, &k);
    float r2 = r * r, lo = NL_FMA(0.6931470036506653f, r, 1.0f), mid = NL_FMA(0.05550733581185341f, r, 0.24022242426872253f),
          hi = NL_FMA(0.001326472614891827f, r, 0.009671512991189957f);
    return nl_exp2_scale(NL_FMA(NL_FMA(hi, r2, mid), r2, lo), k);
}

static inline float nl_exp2_half(float x) {
    uint32_t k;
    float r = nl_exp2_reduce(x, &k);
    float r2 = r * r, lo = NL_FMA(0.6931241750717163f, r, 1.0f), mid = NL_FMA(0.055906426161527634f, r, 0.24024099111557007f);
    return nl_exp2_scale(NL_FMA(NL_FMA(0.009582852944731712f, r2, mid), r2, lo), k);
}

/* Phi(-t) for t in [0, 12.5], the standard normal's lower tail: 2^P(t), P fitted to
 * log2 Phi(-t) on [0, 6] (3e-6 relative); beyond, P keeps falling (negative leading
 * coefficient, no positive root of P') to P(12.5) = -121.2, a normal float's exponent */
static inline float nl_normal_tail_half(float t) {
    float p = NL_FMA(-1.83481075e-06f, t, 6.1598279e-05f);
    p = NL_FMA(p, t, -0.000930524722f);
    p = NL_FMA(p, t, 0.00850789063f);
    p = NL_FMA(p, t, -0.0539600663f);
    p = NL_FMA(p, t, -0.458464384f);
    p = NL_FMA(p, t, -1.15125108f);
    p = NL_FMA(p, t, -0.999995291f);
    return nl_exp2_half(p);
}

/* |v| clamped to 12.5, the range of nl_normal_tail_half (NaN stays NaN) */
static inline float nl_gelu_t(float v) {
    float t = fabsf(v);
    return t > nl_act_bounds[2] ? nl_act_bounds[2] : t;
}

/* GELU(v) = v Phi(v) = max(v, 0) - |v| Phi(-|v|), |v| taken as 12.5 beyond (there
 * |GELU(v)| = 4.2e-36; GELU(inf) = inf, NaN stays NaN) */
static inline float nl_gelu_half(float v) {
    float t = nl_gelu_t(v);
    return NL_FMA(-t, nl_normal_tail_half(t), v > 0.0f ? v : 0.0f);
}

/* GELU'(v) = Phi(v) + v phi(v) = Q K(t) (v < 0) or 1 - Q K(t), Q = Phi(-t), t = |v|, with
 * K(t) = 1 - t phi(t) / Phi(-t) = (t0 - t) R(t): t0 its root (GELU'(-t0) = 0), R of degree 5
 * fitted on [0, 6] (6e-5 relative: GELU' keeps its relative accuracy up to its zero; beyond 6
 * |Q K| < 1e-7) */
static inline float nl_gelu_grad_half(float v) {
    float t = nl_gelu_t(v);
    float r = NL_FMA(-0.000100765174f, t, 0.00212450884f);
    r = NL_FMA(r, t, -0.0187988579f);
    r = NL_FMA(r, t, 0.0932181552f);
    r = NL_FMA(r, t, 0.70908618f);
    r = NL_FMA(r, t, 1.33007395f);
    float q = nl_normal_tail_half(t) * ((0.751791537f - t) * r);
    return v < 0.0f ? q : 1.0f - q;
}

/* x P(x^2) / Q(x^2) for x clamped to [-xmax, xmax], the result clamped to [-1, 1]: P and Q of
 * degrees np - 1 and nq - 1, their coefficients in increasing order (tanh's and erf's form) */
static inline float nl_odd_rational(float x, float xmax, const float *p, int np, const float *q, int nq) {
    x = nl_clampf(x, -xmax, xmax);
    float t = x * x, pv = p[np - 1], qv = q[nq - 1];
    for (int i = np - 2; i >= 0; i--) pv = NL_FMA(pv, t, p[i]);
    for (int i = nq - 2; i >= 0; i--) qv = NL_FMA(qv, t, q[i]);
    return nl_clampf(x * pv / qv, -nl_act_bounds[6], nl_act_bounds[6]);
}

static inline float nl_tanhf(float x) {
    static const float p[] = {1.0f, 0.138191476f, 0.00405152468f, 3.25208384e-05f, 5.40039018e-08f};
    static const float q[] = {1.0f, 0.471524805f, 0.0278931316f, 0.000428507716f, 1.68943166e-06f, 8.02188482e-10f};
    return nl_odd_rational(x, nl_act_bounds[5], p, 5, q, 6);
}

static inline float nl_erff(float x) {
    static const float p[] = {1.12837911f, 0.190406889f, 0.0527487174f, 0.00376561983f, 0.000284880021f,
                              2.05004608e-06f};
    static const float q[] = {1.0f, 0.502076447f, 0.114109233f, 0.0149692232f, 0.00116253109f, 3.80911515e-05f};
    return nl_odd_rational(x, nl_act_bounds[4], p, 6, q, 6);
}

/* the half types' tanh and erf: results rounded to bfloat16 or float16, so fits of lower
 * degree: tanh on [0, 9.2], degrees 3 and 4, 4.5e-7 relative (its derivative, 1 - tanh^2, is
 * taken from it: about as accurate as the float32 one's); erf on [0, 3.5] (erfc(3.5) = 7e-7),
 * degrees 3 and 3, 5.3e-6 relative (0.01 of a float16 ulp; Dynamic erf's derivative comes from
 * exp, not from it). Two and four fused multiply-adds fewer than the float32 ones: Dynamic tanh's
 * bfloat16 passes 0.92x (forward) and 0.95x (backward), Dynamic erf's 0.85x and 0.92x (one
 * thread from cache, (4096, 64)). */
static inline float nl_tanhf_half(float x) {
    static const float p[] = {0.999999523f, 0.128167778f, 0.00283574848f, 1.02309505e-05f};
    static const float q[] = {1.0f, 0.461497754f, 0.0233392026f, 0.000222642004f, 2.08744325e-07f};
    return nl_odd_rational(x, nl_act_bounds[5], p, 4, q, 5);
}

static inline float nl_erff_half(float x) {
    static const float p[] = {1.12837315f, 0.157395512f, 0.0425581746f, 0.000711614673f};
    static const float q[] = {1.0f, 0.472772241f, 0.0953564122f, 0.00899076555f};
    return nl_odd_rational(x, nl_act_bounds[9], p, 4, q, 4);
}

/* exp(-z^2) for the half types (Dynamic erf's derivative): 2^(-u^2), u = z sqrt(log2 e), by
 * nl_exp2_half (4e-6 relative, 1e-5 with the rounding of u^2), the exponent clamped at -125 (S0's
 * bound, nl_act_bounds[3]: the result stays a normal float): no division by ln 2, no upper clamp
 * (-u^2 <= 0), no two-part reduction. Dynamic erf's bfloat16 backward 0.91-0.93x of
 * nl_expf_half(-z^2) (two threads, (32, 3136, 64), both layouts). */
static inline float nl_gauss_half(float z) {
    const float u = z * 1.2011224087864498f, lim = nl_act_bounds[3];
    float t = NL_FMA(-u, u, 0.0f);
    return nl_exp2_half(t < -lim ? -lim : t);
}

static inline float nl_sigmoidf(float x) { return 1.0f / (1.0f + nl_expf(-x)); }

static inline double nl_exp(double x) { return exp(x); }
static inline double nl_tanh(double x) { return tanh(x); }
static inline double nl_erf(double x) { return erf(x); }
static inline double nl_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

#endif
