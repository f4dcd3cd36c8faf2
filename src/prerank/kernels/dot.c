/* Fused gather + dot product (Two-Tower, DAT, FIT "w/o LSS"), one user:
 *
 *   out[i] = bias + scale * < U[m_i], V[rows[i]] >,   m_i = meta ? meta[rows[i]] : 0
 *
 * U is [M][D] and V (the item cache) [R][D]. D is a compile-time constant; the product runs in W-lane
 * vectors with a scalar tail, the lanes are reduced pairwise once per candidate, and the row PF
 * candidates ahead is prefetched. Returns 0, or -1-i for the first candidate i whose row or meta index
 * is out of range (the scores before it are written, none after).
 */

int64_t dot(const float *user, int64_t num_meta, const int64_t *meta, const float *cache, int64_t num_rows,
            const int64_t *rows, int64_t n, float scale, float bias, float *out) {
    for (int64_t i = 0; i < n; i++) {
        const float *u, *v = cache_row(i, rows, n, num_rows, meta, num_meta, cache, D, user, D, &u);
        if (!v) return -1 - i;
        vf acc = (vf){0};
        for (int k = 0; k + W <= D; k += W) {
            vf a, b;
            memcpy(&a, u + k, sizeof a);
            memcpy(&b, v + k, sizeof b);
            acc += a * b;
        }
        float lanes[W];
        memcpy(lanes, &acc, sizeof lanes);
        float total = pairwise_sum(lanes, W);
        for (int k = D / W * W; k < D; k++) total += u[k] * v[k];
        out[i] = bias + scale * total;
    }
    return 0;
}
