/* Fused gather + sum-max late interaction (IntTower's FE-Block, FIT's "w SumMax" ablation), one user:
 *
 *   out[i] = bias + sum_h max_j < U[m_i, h], V[rows[i], j] >,   m_i = meta ? meta[rows[i]] : 0
 *
 * U comes transposed and padded, ut[m][k][hp] (hp < HP; columns h >= H are zero, so their lanes add 0),
 * so that for each k one broadcast of V[j][k] updates a vector of W user heads. Per vector of user heads
 * the HV accumulators stay in registers (one vector at a time measured faster than two: fewer live
 * registers; the item row is re-read from L1); the item row is read straight from the cache (no
 * gathered copy) and the row PF candidates ahead is prefetched. The sum over user heads
 * runs in vector lanes and is reduced pairwise once per candidate (a serial chain of H scalar adds
 * cost about a quarter of the time), so it differs from PyTorch's order by rounding only.
 *
 * Compile-time shape: H (user heads), HV (item heads), D (head width), W (vector lanes), NV (vectors of
 * W user heads, HP = NV * W >= H). Returns 0, or -1-i for the first
 * candidate i whose row or meta index is out of range (the scores before it are written, none after).
 */

#define HP (NV * W)

int64_t sum_max(const float *ut, int64_t num_meta, const int64_t *meta, const float *cache, int64_t num_rows,
                const int64_t *rows, int64_t n, float bias, float *out) {
    for (int64_t i = 0; i < n; i++) {
        const float *u, *v = cache_row(i, rows, n, num_rows, meta, num_meta, cache, HV * D, ut, D * HP, &u);
        if (!v) return -1 - i;
        vf sum = (vf){0};
        for (int c = 0; c < NV; c++) {
            vf acc[HV];
            for (int j = 0; j < HV; j++) acc[j] = (vf){0};
            for (int k = 0; k < D; k++) {
                vf uk;
                memcpy(&uk, u + k * HP + c * W, sizeof uk);
                for (int j = 0; j < HV; j++) acc[j] += v[j * D + k] * uk;
            }
            vf best = acc[0];
            for (int j = 1; j < HV; j++) best = vmax(best, acc[j]);
            sum += best;
        }
        /* padded user heads have zero columns, so their lanes add 0 */
        float lanes[W];
        memcpy(lanes, &sum, sizeof lanes);
        out[i] = bias + pairwise_sum(lanes, W);
    }
    return 0;
}
