/* Fused gather + the FC head of FIT's "w FC" ablation (its per-candidate part), one user:
 *
 *   out[i] = c0 + sum_k w[k] * ReLU(U[m_i, k] + V[rows[i], k]),   m_i = meta ? meta[rows[i]] : 0
 *
 * U is [M][D] (the user's first-layer part per meta vector), V (the item cache) [R][D] (the item's part
 * with the layer's bias). D and W (vector lanes) are compile-time constants; the row PF candidates ahead
 * is prefetched.
 * Returns 0, or -1-i for the first candidate i whose row or meta index is out of range.
 */


int64_t fc(const float *user, int64_t num_meta, const int64_t *meta, const float *cache, int64_t num_rows,
           const int64_t *rows, int64_t n, const float *w, float c0, float *out) {
    for (int64_t i = 0; i < n; i++) {
        const float *u, *v = cache_row(i, rows, n, num_rows, meta, num_meta, cache, D, user, D, &u);
        if (!v) return -1 - i;
        /* W-lane vectors, then the lanes pairwise (short dependency chains), then a scalar tail */
        vf acc = (vf){0};
        for (int k = 0; k + W <= D; k += W) {
            vf a, b, c;
            memcpy(&a, u + k, sizeof a);
            memcpy(&b, v + k, sizeof b);
            memcpy(&c, w + k, sizeof c);
            vf z = a + b;
            vi pos = z > (vf){0};
            acc += c * (vf)(pos & (vi)z);
        }
        float lanes[W];
        memcpy(lanes, &acc, sizeof lanes);
        float total = c0 + pairwise_sum(lanes, W);
        for (int k = D / W * W; k < D; k++) {
            const float z = u[k] + v[k];
            total += w[k] * (z > 0.0f ? z : 0.0f);
        }
        out[i] = total;
    }
    return 0;
}
