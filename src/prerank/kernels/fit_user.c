/* One served FIT user with the MQM, in one call: the user's field lookups (fields.c), the DIN attention of every meta
 * vector over the user's field embeddings, and the user tower and the scorer's user part once per meta vector (mlp.c's
 * affine layers). In PyTorch this is about 25 operator calls on tiny tensors. It covers users without behaviour
 * sequences, whose DIN keys are their F field embeddings (prerank.models.fit.FIT.user_inputs).
 *
 * struct plan (prerank.kernels.request.fit_user_plan binds it once):
 * - DIN (prerank.layers.attention.DINAttention.shared_queries): the activation unit's first layer folded with the M
 *   meta vectors, fold_w [EMB][M * H1] and fold_b [M * H1] (DINAttention.fold_queries), then a sigmoid and the unit's
 *   other n_unit layers (unit_ints/unit_ptrs as mlp.c; the last gives one weight); normalize: softmax over the keys
 *   (else the raw weights, as DIN's paper). interest[m] = sum_f weight[f][m] x[f].
 * - Per meta vector m: the n_tower layers of tower_ints/tower_ptrs (the user MLP, then the scorer's user part) map
 *   [x (F * EMB); interest[m] (EMB); meta[m] (EMB)] to out[m] (out_dim values).
 * width: the widest layer of either chain and H1. inputs, len: each user field's values and length (fields.c).
 * Returns 0, or 1 + f for the first field f with an id outside its table.
 */
struct plan {
    const int64_t *kind, *table_rows;
    const float *const *tables;
    int64_t n_fields;
    const float *fold_w, *fold_b, *meta;
    int64_t m, h1, normalize;
    const int64_t *unit_ints;
    const float *const *unit_ptrs;
    int64_t n_unit;
    const int64_t *tower_ints;
    const float *const *tower_ptrs;
    int64_t n_tower, width, out_dim;
};

int64_t fit_user(const struct plan *p, const void *const *inputs, const int64_t *len, float *out) {
    const int64_t nf = p->n_fields, m = p->m, h1 = p->h1, in_dim = (nf + 2) * EMB;
    float z[in_dim], h[m * h1], weight[nf][m], interest[m][EMB], scratch[3 * p->width];
    const int64_t err = fields(p->kind, p->table_rows, len, p->tables, inputs, nf, z);
    if (err) return -err;
    for (int64_t f = 0; f < nf; f++) {
        const float *key = z + f * EMB;
        for (int64_t j = 0; j < m * h1; j++) h[j] = p->fold_b[j];
        for (int d = 0; d < EMB; d++)
            for (int64_t j = 0; j < m * h1; j++) h[j] += key[d] * p->fold_w[d * m * h1 + j];
        for (int64_t j = 0; j < m * h1; j++) h[j] = 1.0f / (1.0f + expf(-h[j]));
        for (int64_t q = 0; q < m; q++) chain(h + q * h1, p->n_unit, p->unit_ints, p->unit_ptrs, scratch, p->width,
                                              &weight[f][q]);
    }
    for (int64_t q = 0; q < m; q++) {
        if (p->normalize) {
            float top = weight[0][q], total = 0.0f;
            for (int64_t f = 1; f < nf; f++) top = weight[f][q] > top ? weight[f][q] : top;
            for (int64_t f = 0; f < nf; f++) total += weight[f][q] = expf(weight[f][q] - top);
            for (int64_t f = 0; f < nf; f++) weight[f][q] /= total;
        }
        for (int d = 0; d < EMB; d++) {
            interest[q][d] = 0.0f;
            for (int64_t f = 0; f < nf; f++) interest[q][d] += weight[f][q] * z[f * EMB + d];
        }
    }
    for (int64_t q = 0; q < m; q++) {
        memcpy(z + nf * EMB, interest[q], sizeof interest[q]);
        memcpy(z + (nf + 1) * EMB, p->meta + q * EMB, EMB * sizeof(float));
        chain(z, p->n_tower, p->tower_ints, p->tower_ptrs, scratch, p->width, out + q * p->out_dim);
    }
    return 0;
}
