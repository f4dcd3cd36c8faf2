/* Shared by the row-wise kernels (sum_max, dot, lss, fc); prerank.kernels.native prepends it to their
 * source. cache_row: candidate i's cache row (or NULL when its row or its meta index is out of range), its user row
 * in *u, and a prefetch of the cache row PF candidates ahead (the rows are in random order).
 * pairwise_sum: the sum of w floats (w a power of two) in pairs, short dependency chains instead of a
 * serial chain of w adds; overwrites x. */
#include <stdint.h>
#include <string.h>

#define PF 8

static inline const float *cache_row(int64_t i, const int64_t *rows, int64_t n, int64_t num_rows, const int64_t *meta,
                                     int64_t num_meta, const float *cache, int64_t row_floats, const float *user,
                                     int64_t user_floats, const float **u) {
    const int64_t r = rows[i];
    if (r < 0 || r >= num_rows) return 0;
    const int64_t m = meta ? meta[r] : 0;
    if (m < 0 || m >= num_meta) return 0;
    if (i + PF < n && rows[i + PF] >= 0 && rows[i + PF] < num_rows) {
        const char *p = (const char *)(cache + rows[i + PF] * row_floats);
        for (int64_t b = 0; b < row_floats * 4; b += 64) __builtin_prefetch(p + b);
    }
    *u = user + m * user_floats;
    return cache + r * row_floats;
}

static inline float pairwise_sum(float *x, int w) {
    for (int s = w / 2; s > 0; s /= 2)
        for (int l = 0; l < s; l++) x[l] += x[l + s];
    return x[0];
}
