/* IntTower's FE-Block score for one user against cached item heads, with the candidates in vector lanes (W per
 * block):
 *
 *   out[i] = bias + sum_h max_j < U[h], V[rows[i], j] >
 *
 * Each block's item rows are gathered and transposed (vec.h), so the H x HV dot products are lane-wise
 * multiply-adds with one user scalar broadcast each, and the max and sum need no horizontal step. HB user heads
 * are scored per pass over the block's item heads (HB x HV accumulators in registers). Item rows of more than 512
 * floats or 16 heads are not taken (prerank.serve.native.request: their transposed block would not fit in L1).
 *
 * Compile-time shape: H user heads, HV item heads, D values per head, W (8 or 16), HB dividing H. u is [H][D].
 * Returns 0, or -1-i for the first candidate i of a block whose row is out of range (nothing of that block is
 * written).
 */

int64_t sum_max_block(const float *u, const elem_t *cache, int64_t num_rows, const int64_t *rows, int64_t n,
                      float bias, float *out) {
    vf vt[HV * D];
    for (int64_t start = 0; start < n; start += W) {
        int64_t block[W];
        const int64_t valid = block_rows(block, rows, start, n, num_rows);
        if (valid < 0) return valid;
        transpose(vt, cache, HV * D, block);
        vf total = splat(0.0f);
        for (int h = 0; h < H; h += HB) {
            vf acc[HB][HV];
            for (int b = 0; b < HB; b++)
                for (int j = 0; j < HV; j++) acc[b][j] = splat(0.0f);
            for (int k = 0; k < D; k++)
                for (int j = 0; j < HV; j++) {
                    const vf x = vt[j * D + k];
                    for (int b = 0; b < HB; b++) acc[b][j] += u[(h + b) * D + k] * x;
                }
            for (int b = 0; b < HB; b++) {
                vf best = acc[b][0];
                for (int j = 1; j < HV; j++) best = vmax(best, acc[b][j]);
                total += best;
            }
        }
        float lanes[W];
        memcpy(lanes, &total, sizeof lanes);
        for (int c = 0; c < valid; c++) out[start + c] = bias + lanes[c];
    }
    return 0;
}
