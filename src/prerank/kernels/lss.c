/* Fused gather + FIT's Lightweight Similarity Scorer (its per-candidate part), one user:
 *
 *   out[i] = c0 + sum_h c[h] * PReLU_h(< U[m_i, h], X[rows[i], h] > + b[h]),   m_i = meta ? meta[rows[i]] : 0
 *
 * U is [M][H][D] (user heads per meta vector), X (the item cache) [R][H][D] (item heads already mixed per
 * user head); params holds b, the PReLU slopes a and c, each [H]. PReLU_h(x) = x if x >= 0 else a[h] x.
 * H and D are compile-time constants; the row PF candidates ahead is prefetched. Returns 0, or -1-i for
 * the first candidate i whose row or meta index is out of range (the scores before it are written).
 */

int64_t lss(const float *user, int64_t num_meta, const int64_t *meta, const float *cache, int64_t num_rows,
            const int64_t *rows, int64_t n, const float *params, float c0, float *out) {
    const float *b = params, *a = params + H, *c = params + 2 * H;
    for (int64_t i = 0; i < n; i++) {
        const float *u, *x = cache_row(i, rows, n, num_rows, meta, num_meta, cache, H * D, user, H * D, &u);
        if (!x) return -1 - i;
        float total = c0;
        for (int h = 0; h < H; h++) {
            float s = 0.0f;
            for (int k = 0; k < D; k++) s += u[h * D + k] * x[h * D + k];
            s += b[h];
            total += c[h] * (s >= 0.0f ? s : a[h] * s);
        }
        out[i] = total;
    }
    return 0;
}
