/* Fused gather + FIT's Lightweight Similarity Scorer (its per-candidate part), one user:
 *
 *   out[i] = c0 + sum_h c[h] * PReLU_h(< U[m_i, h], X[rows[i], h] > + b[h]),   m_i = meta ? meta[rows[i]] : 0
 *
 * U is [M][H][D] (user heads per meta vector), X (the item cache) [R][H][D] (item heads already mixed per
 * user head); params holds b, the PReLU slopes a and c, each [H]. PReLU_h(x) = x if x >= 0 else a[h] x.
 * H and D are compile-time constants; the row PF candidates ahead is prefetched. Returns 0, or -1-i for
 * the first candidate i whose row or meta index is out of range (the scores before it are written).
 */
#include <stdint.h>

#define PF 8

int64_t lss(const float *user, int64_t num_meta, const int64_t *meta, const float *cache, int64_t num_rows,
            const int64_t *rows, int64_t n, const float *params, float c0, float *out) {
    const float *b = params, *a = params + H, *c = params + 2 * H;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = rows[i];
        if (r < 0 || r >= num_rows) return -1 - i;
        const int64_t m = meta ? meta[r] : 0;
        if (m < 0 || m >= num_meta) return -1 - i;
        if (i + PF < n && rows[i + PF] >= 0 && rows[i + PF] < num_rows) {
            const char *p = (const char *)(cache + rows[i + PF] * (H * D));
            for (int q = 0; q < H * D * 4; q += 64) __builtin_prefetch(p + q);
        }
        const float *x = cache + r * (H * D);
        const float *u = user + m * (H * D);
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
