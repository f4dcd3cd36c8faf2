/* One served IntTower request in one call: the user's field lookups (fields.c), Light-SE, the tower's layers and each
 * layer's head projection (mlp.c's affine) and the sum-max kernel over the cached item heads (sum_max_block.c), which
 * prerank.serve.native.build prepends to this file. In PyTorch the user's side is about 50 small operator calls.
 *
 * struct plan: what prerank.serve.native.request.int_tower_plan binds once. Light-SE (se_w [F][F], se_b [F]):
 * x[f] *= 1 + softmax_f(se_w z + se_b)[f], z[f] the mean of field f's EMB values (prerank.layers.field.LightSE, whose
 * E + E o A this is). ints/ptrs describe 2L affine layers as mlp.c: the tower's L layers (each with a ReLU), then
 * one projection per layer to H / L heads of D; the user's H heads are the projections of layers 1..L in order (the
 * widths are checked when the plan is bound; width: the widest layer). inputs, len: each user field's values and
 * length (fields.c); rows, n, out: the candidates' cache rows and their scores. Scratch lives on the stack, so
 * calls may run concurrently.
 * Returns 0; 1 + f for the first field f with an id outside its table; or -1-i for the first candidate i whose row
 * is outside [0, num_rows).
 */
struct plan {
    const int64_t *kind, *table_rows;
    const float *const *tables;
    int64_t n_fields;
    const float *se_w, *se_b;
    const int64_t *ints;
    const float *const *ptrs;
    int64_t n_layers, width;
    const elem_t *cache;
    int64_t num_rows;
    float bias;
};

static void light_se(float *x, int64_t n, const float *w, const float *b) {
    float z[n], s[n], top = -INFINITY, total = 0.0f;
    for (int64_t f = 0; f < n; f++) {
        z[f] = 0.0f;
        for (int d = 0; d < EMB; d++) z[f] += x[f * EMB + d];
        z[f] /= EMB;
    }
    for (int64_t j = 0; j < n; j++) {
        s[j] = b[j];
        for (int64_t f = 0; f < n; f++) s[j] += w[j * n + f] * z[f];
        top = s[j] > top ? s[j] : top;
    }
    for (int64_t j = 0; j < n; j++) total += s[j] = expf(s[j] - top);
    for (int64_t f = 0; f < n; f++)
        for (int d = 0; d < EMB; d++) x[f * EMB + d] += x[f * EMB + d] * (s[f] / total);
}

int64_t int_tower_request(const struct plan *p, const void *const *inputs, const int64_t *len, const int64_t *rows,
                          int64_t n, float *out) {
    const int64_t layers = p->n_layers, per_layer = H / layers * D;
    float x[p->n_fields * EMB], h[2][p->width], u[H * D];
    const int64_t err = fields(p->kind, p->table_rows, len, p->tables, inputs, p->n_fields, x);
    if (err) return -err;
    light_se(x, p->n_fields, p->se_w, p->se_b);
    const float *in = x;
    for (int64_t l = 0; l < layers; l++) {
        const int64_t *t = p->ints + 3 * l, *q = p->ints + 3 * (layers + l);
        const float *const *tw = p->ptrs + 2 * l, *const *qw = p->ptrs + 2 * (layers + l);
        affine(in, t[0], t[1], tw[0], tw[1], t[2], h[l % 2]);
        affine(h[l % 2], q[0], q[1], qw[0], qw[1], q[2], u + l * per_layer);
        in = h[l % 2];
    }
    return sum_max_block(u, p->cache, p->num_rows, rows, n, p->bias, out);
}
