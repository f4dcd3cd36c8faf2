/* Fused gather + RankTower's per-candidate part (one gated cross-attention layer, Eq. 3-7, and the
 * maximum-similarity score, Eq. 8), one user against N cached items.
 *
 * Candidates are processed in blocks of W (the vector lanes): each block's cached item states are
 * transposed into "one vector per scalar" (lane c = candidate c), so every step below is a lane-wise
 * vector operation with no horizontal reduction. Per block, with p over user heads and q over item heads:
 *
 *   item branch:  a[q,p] = softmax_p(s_i <k_u[p], q_i[q]>)
 *                 x_i[q] = r_i[q] + ((sum_p a[q,p] v_u[p]) o g_i[q]) Wc_i,   e_i[q] = LN_i(x_i[q])
 *   user branch:  b[p,q] = softmax_q(s_u <q_u[p], k_i[q]>)
 *                 x_u[p] = r_u[p] + ((sum_q b[p,q] v_i[q]) o g_u[p]) Wc_u,   e_u[p] = LN_u(x_u[p])
 *   score:        bias + inv_tau * sum_p max_q cos(e_u[p], e_i[q])
 *
 * Each step runs for all heads side by side (the scores of a branch in one loop, then every softmax, then
 * every LayerNorm), so that the CPU has independent dependency chains to overlap: about 20% faster than head
 * after head. The 1/sqrt(d_k) scales go into the exponent of the softmax, and the cosine multiplies by
 * reciprocal norms. Norms are clamped at 1e-12 as in F.normalize (the squared norm at 1e-24).
 * r are residuals with the W_O bias, already centred, and Wc the column-centred W_O^T, so x is centred
 * and LN needs only the variance (prerank.layers.gau's prepared states). A bfloat16 cache's r is centred only up
 * to its rounding, which LayerNorm's own mean would remove: each item row of r is centred again after the gather. exp is a degree-6
 * polynomial after range reduction (relative error about 1e-7; its argument is <= 0 here).
 *
 * The user's states are computed here from E_u ([HU][K]), once per call, as
 * prerank.layers.gau.GatedCrossAttentionLayer.prepare_user does: q_u = SiLU(E_u W_Q^u), g_u = sigmoid(E_u W_U^u),
 * k_u = SiLU(E_u W_K^i), v_u = SiLU(E_u W_V^i) (Eq. 5) and r_u = E_u + b_O^u, centred. fixed (the user-independent
 * parameters, floats): Wc_i [DV][K], Wc_u [DV][K], ln_i weight, ln_i bias, ln_u weight, ln_u bias [K] each, then the
 * user-side projections in torch's Linear layout, each weight followed by its bias: W_Q^u [DK][K], W_U^u [DV][K],
 * W_K^i [DK][K], W_V^i [DV][K], and b_O^u [K].
 * Scalars: s_i, s_u (1/sqrt(d_k) of each branch), eps_i, eps_u, inv_tau, bias.
 * Item states (the cache, [R][HI][.], floats or bfloat16: elem_t of vec.h): r_i (K), q_i (DK), g_i (DV), k_i (DK),
 * v_i (DV).
 * Returns 0, or -1-i for the first candidate i of a block whose row is out of range (nothing of that
 * block is written).
 */
#include <math.h>

/* exp(x) for x <= 0 (x < -87 gives about 0) */
static inline vf vexp(vf x) {
    x = vmax(x, splat(-87.0f));
    vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi); /* round to nearest (x <= 0) */
    vf nf = __builtin_convertvector(n, vf);
    vf r = x - nf * 0.693145751953125f - nf * 1.428606765330187e-06f;
    vf p = 1.0f / 720.0f + r * (1.0f / 5040.0f);
    p = 1.0f / 120.0f + r * p;
    p = 1.0f / 24.0f + r * p;
    p = 1.0f / 6.0f + r * p;
    p = 0.5f + r * p;
    p = 1.0f + r * p;
    p = 1.0f + r * p;
    vi bits = (n + 127) << 23;
    return p * (vf)bits;
}

#if defined(__AVX512F__) && W == 16
#include <immintrin.h>
/* 1/x and 1/sqrt(x), x > 0: the 14-bit estimates of AVX-512 and one Newton step (relative error about 1e-7), in
 * place of divisions and square roots, which take one port for many cycles: 2% faster per call */
static inline vf vrcp(vf x) {
    const vf r = (vf)_mm512_rcp14_ps((__m512)x);
    return r * (2.0f - x * r);
}
static inline vf vrsqrt(vf x) {
    const vf r = (vf)_mm512_rsqrt14_ps((__m512)x);
    return r * (1.5f - 0.5f * x * r * r);
}
#else
static inline vf vsqrt(vf x) {
    float a[W];
    memcpy(a, &x, sizeof a);
    for (int l = 0; l < W; l++) a[l] = sqrtf(a[l]);
    memcpy(&x, a, sizeof a);
    return x;
}
static inline vf vrcp(vf x) { return 1.0f / x; }
static inline vf vrsqrt(vf x) { return 1.0f / vsqrt(x); }
#endif

/* exp(scale * (s[j] - max_j s)) / sum over n vectors in place (scale > 0, so the max commutes with it) */
static inline void softmax(vf *s, int n, float scale) {
    vf m = s[0];
    for (int j = 1; j < n; j++) m = vmax(m, s[j]);
    vf total = splat(0.0f);
    for (int j = 0; j < n; j++) {
        s[j] = vexp((s[j] - m) * scale);
        total += s[j];
    }
    vf inv = vrcp(total);
    for (int j = 0; j < n; j++) s[j] *= inv;
}

/* x[K] += o[DV] w, w a [DV][K] matrix; one outer product per d keeps K independent accumulators */
static inline void add_product(vf *x, const vf *o, const float *w) {
    for (int d = 0; d < DV; d++)
        for (int k = 0; k < K; k++) x[k] += o[d] * w[d * K + k];
}

/* LayerNorm of n centred rows x[n][K] in place, side by side (independent chains, two per row); inv[h] = 1 / the
 * norm of row h after the affine map (clamped at 1e-12, as F.normalize) */
static inline void layer_norms(vf (*x)[K], int n, const float *w, const float *b, float eps, vf *inv) {
    vf ss[HI > HU ? HI : HU];
    for (int h = 0; h < n; h++) {
        vf even = splat(0.0f), odd = splat(0.0f);
        for (int k = 0; k < K; k++) {
            if (k % 2) odd += x[h][k] * x[h][k];
            else even += x[h][k] * x[h][k];
        }
        ss[h] = even + odd;
    }
    for (int h = 0; h < n; h++) {
        const vf rstd = vrsqrt(ss[h] * (1.0f / K) + eps);
        vf even = splat(0.0f), odd = splat(0.0f);
        for (int k = 0; k < K; k++) {
            x[h][k] = x[h][k] * rstd * w[k] + b[k];
            if (k % 2) odd += x[h][k] * x[h][k];
            else even += x[h][k] * x[h][k];
        }
        inv[h] = vrsqrt(vmax(even + odd, splat(1e-24f)));
    }
}

/* y[j] = SiLU or sigmoid of (W x + b)[j] for j < n; w [n][K] */
static void project(float *y, const float *x, const float *w, const float *b, int n, int silu) {
    for (int j = 0; j < n; j++) {
        float z = b[j];
        for (int k = 0; k < K; k++) z += w[j * K + k] * x[k];
        y[j] = (silu ? z : 1.0f) / (1.0f + expf(-z));
    }
}

int64_t rank_tower(const float *eu, const float *fixed, const elem_t *ri, const elem_t *qi, const elem_t *gi,
                   const elem_t *ki, const elem_t *vi_, int64_t num_rows, const int64_t *rows, int64_t n, float s_i,
                   float s_u, float eps_i, float eps_u, float inv_tau, float bias, float *out) {
    const float *wci = fixed, *wcu = wci + DV * K;
    const float *lni_w = wcu + DV * K, *lni_b = lni_w + K, *lnu_w = lni_b + K, *lnu_b = lnu_w + K;
    const float *wq = lnu_b + K, *bq = wq + DK * K, *wu = bq + DK, *bu = wu + DV * K;
    const float *wk = bu + DV, *bk = wk + DK * K, *wv = bk + DK, *bv = wv + DV * K, *bo = bv + DV;

    float ku[HU * DK], qu[HU * DK], vu[HU * DV], ru[HU * K], gu[HU * DV];
    for (int p = 0; p < HU; p++) {
        const float *e = eu + p * K;
        project(qu + p * DK, e, wq, bq, DK, 1);
        project(gu + p * DV, e, wu, bu, DV, 0);
        project(ku + p * DK, e, wk, bk, DK, 1);
        project(vu + p * DV, e, wv, bv, DV, 1);
        float mean = 0.0f;
        for (int k = 0; k < K; k++) mean += e[k] + bo[k];
        mean /= K;
        for (int k = 0; k < K; k++) ru[p * K + k] = e[k] + bo[k] - mean;
    }

    vf r_t[HI * K], q_t[HI * DK], g_t[HI * DV], k_t[HI * DK], v_t[HI * DV];
    vf e_i[HI][K], inv_i[HI], e_u[HU][K], inv_u[HU], a[HI][HU], b[HU][HI], o[DV];
    for (int64_t start = 0; start < n; start += W) {
        int64_t block[W];
        const int64_t valid = block_rows(block, rows, start, n, num_rows);
        if (valid < 0) return valid;
        transpose(r_t, ri, HI * K, block);
        transpose(q_t, qi, HI * DK, block);
        transpose(g_t, gi, HI * DV, block);
        transpose(k_t, ki, HI * DK, block);
        transpose(v_t, vi_, HI * DV, block);
#if defined(BF16) && BF16
        for (int q = 0; q < HI; q++) {
            vf mean = splat(0.0f);
            for (int k = 0; k < K; k++) mean += r_t[q * K + k];
            mean *= 1.0f / K;
            for (int k = 0; k < K; k++) r_t[q * K + k] -= mean;
        }
#endif

        /* attention scores, one branch after the other: 16 accumulators each fit the registers, where both branches
         * at once spilled (4% faster per call) */
        for (int q = 0; q < HI; q++)
            for (int p = 0; p < HU; p++) a[q][p] = b[p][q] = splat(0.0f);
        for (int d = 0; d < DK; d++)
            for (int q = 0; q < HI; q++) {
                const vf x = q_t[q * DK + d];
                for (int p = 0; p < HU; p++) a[q][p] += ku[p * DK + d] * x;
            }
        for (int d = 0; d < DK; d++)
            for (int q = 0; q < HI; q++) {
                const vf y = k_t[q * DK + d];
                for (int p = 0; p < HU; p++) b[p][q] += qu[p * DK + d] * y;
            }
        for (int q = 0; q < HI; q++) softmax(a[q], HU, s_i);
        for (int p = 0; p < HU; p++) softmax(b[p], HI, s_u);

        /* item branch: each item head attends over the user's heads */
        for (int q = 0; q < HI; q++) {
            for (int d = 0; d < DV; d++) {
                vf acc = a[q][0] * vu[d];
                for (int p = 1; p < HU; p++) acc += a[q][p] * vu[p * DV + d];
                o[d] = acc * g_t[q * DV + d];
            }
            for (int k = 0; k < K; k++) e_i[q][k] = r_t[q * K + k];
            add_product(e_i[q], o, wci);
        }
        layer_norms(e_i, HI, lni_w, lni_b, eps_i, inv_i);

        /* user branch: each user head attends over the item's heads */
        for (int p = 0; p < HU; p++) {
            for (int d = 0; d < DV; d++) {
                vf acc = b[p][0] * v_t[d];
                for (int q = 1; q < HI; q++) acc += b[p][q] * v_t[q * DV + d];
                o[d] = acc * gu[p * DV + d];
            }
            for (int k = 0; k < K; k++) e_u[p][k] = splat(ru[p * K + k]);
            add_product(e_u[p], o, wcu);
        }
        layer_norms(e_u, HU, lnu_w, lnu_b, eps_u, inv_u);

        /* each user head's best cosine over the item heads */
        vf total = splat(0.0f);
        for (int p = 0; p < HU; p++) {
            vf dot[HI];
            for (int q = 0; q < HI; q++) dot[q] = e_u[p][0] * e_i[q][0];
            for (int k = 1; k < K; k++)
                for (int q = 0; q < HI; q++) dot[q] += e_u[p][k] * e_i[q][k];
            vf best = dot[0] * inv_i[0];
            for (int q = 1; q < HI; q++) best = vmax(best, dot[q] * inv_i[q]);
            total += best * inv_u[p];
        }
        float lanes[W];
        memcpy(lanes, &total, sizeof lanes);
        for (int c = 0; c < valid; c++) out[start + c] = bias + inv_tau * lanes[c];
    }
    return 0;
}
