/* One served RankTower request in one call: the user's field lookups (fields.c), its multi-head gated network
 * (mlp.c, Eq. 1) and the cross-attention + maximum-similarity kernel over the cached items (rank_tower.c, Eq. 3-8),
 * which prerank.serve.native.build prepends to this file. Between them a request otherwise paid for three Python calls,
 * whose code and data come back from L3 after the kernel has streamed the item cache through L2.
 *
 * struct plan: what prerank.serve.native.request.rank_tower_plan binds once (the arguments of fields, mlp and rank_tower
 * that do not change between requests); inputs, len: each user field's values and length (fields.c); rows, n, out:
 * the candidates' cache rows and their scores (rank_tower.c). The gated network maps the F * D field embeddings to
 * HU * K values (checked when the plan is bound). Scratch lives on the stack, so calls may run concurrently.
 * Returns 0; 1 + f for the first field f with an id outside its table; or -1-i for the first candidate i whose row is
 * outside [0, num_rows).
 */
struct plan {
    const int64_t *kind, *table_rows;
    const float *const *tables;
    int64_t n_fields;
    const int64_t *ints;
    const float *const *ptrs;
    int64_t n_a, n_b, width;
    const float *fixed;
    const elem_t *ri, *qi, *gi, *ki, *vi;
    int64_t num_rows;
    float s_i, s_u, eps_i, eps_u, inv_tau, bias;
};

int64_t rank_tower_request(const struct plan *p, const void *const *inputs, const int64_t *len, const int64_t *rows,
                           int64_t n, float *out) {
    float x[p->n_fields * EMB], scratch[3 * p->width], eu[HU * K];
    const int64_t err = fields(p->kind, p->table_rows, len, p->tables, inputs, p->n_fields, x);
    if (err) return -err;
    mlp(x, p->n_a, p->n_b, p->ints, p->ptrs, p->width, scratch, eu);
    return rank_tower(eu, p->fixed, p->ri, p->qi, p->gi, p->ki, p->vi, p->num_rows, rows, n, p->s_i, p->s_u, p->eps_i,
                      p->eps_u, p->inv_tau, p->bias, out);
}
