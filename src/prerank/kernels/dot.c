/* Fused gather + dot product (Two-Tower, DAT, FIT "w/o LSS"), one user:
 *
 *   out[i] = bias + scale * < U[m_i], V[rows[i]] >,   m_i = meta ? meta[rows[i]] : 0
 *
 * U is [M][D] and V (the item cache) [R][D]. D is a compile-time constant; the product runs in W-lane
 * vectors with a scalar tail, the lanes are reduced pairwise once per candidate, and the row PF
 * candidates ahead is prefetched. Returns 0, or -1-i for the first candidate i whose row or meta index
 * is out of range (the scores before it are written, none after).
 */
#include <stdint.h>
#include <string.h>

typedef float vf __attribute__((vector_size(W * 4)));
#define PF 8

int64_t dot(const float *user, int64_t num_meta, const int64_t *meta, const float *cache, int64_t num_rows,
            const int64_t *rows, int64_t n, float scale, float bias, float *out) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = rows[i];
        if (r < 0 || r >= num_rows) return -1 - i;
        const int64_t m = meta ? meta[r] : 0;
        if (m < 0 || m >= num_meta) return -1 - i;
        if (i + PF < n && rows[i + PF] >= 0 && rows[i + PF] < num_rows) {
            const char *p = (const char *)(cache + rows[i + PF] * D);
            for (int b = 0; b < D * 4; b += 64) __builtin_prefetch(p + b);
        }
        const float *v = cache + r * D;
        const float *u = user + m * D;
        vf acc = (vf){0};
        for (int k = 0; k + W <= D; k += W) {
            vf a, b;
            memcpy(&a, u + k, sizeof a);
            memcpy(&b, v + k, sizeof b);
            acc += a * b;
        }
        float lanes[W];
        memcpy(lanes, &acc, sizeof lanes);
        for (int w = W / 2; w > 0; w /= 2)
            for (int l = 0; l < w; l++) lanes[l] += lanes[l + w];
        float total = lanes[0];
        for (int k = D / W * W; k < D; k++) total += u[k] * v[k];
        out[i] = bias + scale * total;
    }
    return 0;
}
