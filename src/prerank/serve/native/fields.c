/* One row of prerank.layers.embedding.EmbeddingTables.fields: F feature fields of EMB floats into out[F][EMB].
 *
 * A request scores one user, whose tower starts with a handful of lookups; in PyTorch each is a few
 * operator calls, and their fixed cost is most of a small tower's time. Here they are one call.
 *
 * kind[f]: 0 categorical (one id: its table row), 1 sequence pooled by mean over its non-zero ids (0 when
 * there are none), 2 sequence pooled by sum, 3 dense (bias + value * weight). rows[f]: the table's rows (0 for
 * dense); len[f]: how many ids the field has (1 for categorical, L for a sequence, unused for dense).
 * tables[2f] is the field's table [rows][EMB] (dense: its weight [EMB]), tables[2f + 1] the dense bias [EMB].
 * inputs[f]: the field's ids (int64) or its dense value (float).
 * Returns 0, or -1-f for the first field f with an id outside [0, rows[f]) (out is then incomplete).
 */
#include <stdint.h>

int64_t fields(const int64_t *kind, const int64_t *rows, const int64_t *len, const float *const *tables,
               const void *const *inputs, int64_t n_fields, float *out) {
    for (int64_t f = 0; f < n_fields; f++, out += EMB) {
        const float *t = tables[2 * f];
        if (kind[f] == 3) {
            const float *b = tables[2 * f + 1], x = *(const float *)inputs[f];
            for (int d = 0; d < EMB; d++) out[d] = b[d] + x * t[d];
            continue;
        }
        const int64_t *ids = inputs[f];
        for (int d = 0; d < EMB; d++) out[d] = 0.0f;
        int64_t count = 0;
        for (int64_t j = 0; j < len[f]; j++) {
            const int64_t id = ids[j];
            if (id < 0 || id >= rows[f]) return -1 - f;
            if (kind[f] == 0 || id > 0) {
                count++;
                for (int d = 0; d < EMB; d++) out[d] += t[id * EMB + d];
            }
        }
        if (kind[f] == 1 && count > 1)
            for (int d = 0; d < EMB; d++) out[d] /= (float)count;
    }
    return 0;
}
