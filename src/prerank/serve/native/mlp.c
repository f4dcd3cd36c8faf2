/* One row through one or two chains of affine layers: the user tower of a served request (a batch of one row), where
 * PyTorch spends most of the time in the fixed cost of its operator calls rather than in arithmetic.
 *
 * Layer l: out = W_l in + b_l (torch's Linear layout, W_l [out][in]), then its activation: 0 none, 1 ReLU, 2 sigmoid
 * (prerank.serve.native.mlp's NONE, RELU, SIGMOID). Chain a is
 * layers [0, n_a), chain b the n_b layers after them, and each chain's first layer reads x. With n_b = 0,
 * y = chain_a(x); else y = chain_a(x) o sigmoid(chain_b(x)) (RankTower's multi-head gated network, Eq. 1-2).
 * ints[3l .. 3l + 2]: layer l's in and out widths and activation; ptrs[2l], ptrs[2l + 1]: its weight and bias.
 * scratch: 3 * width floats, width >= every layer's out.
 * Four outputs at a time, each a dot product in W-lane partial sums (four independent chains), added in pairs.
 */
#include <math.h>

#define J 4

static void affine(const float *x, int64_t in, int64_t out, const float *w, const float *b, int64_t act, float *y) {
    for (int64_t j0 = 0; j0 < out; j0 += J) {
        const int64_t nj = out - j0 < J ? out - j0 : J;
        vf acc[J];
        float s[J];
        for (int j = 0; j < J; j++) acc[j] = splat(0.0f);
        int64_t i = 0;
        for (; i + W <= in; i += W) {
            vf c;
            memcpy(&c, x + i, sizeof c);
            for (int j = 0; j < nj; j++) {
                vf a;
                memcpy(&a, w + (j0 + j) * in + i, sizeof a);
                acc[j] += a * c;
            }
        }
        for (int j = 0; j < nj; j++) {
            float lanes[W];
            memcpy(lanes, &acc[j], sizeof lanes);
            s[j] = b[j0 + j] + pairwise_sum(lanes, W);
            for (int64_t k = i; k < in; k++) s[j] += w[(j0 + j) * in + k] * x[k];
            y[j0 + j] = act == 1 && s[j] < 0.0f ? 0.0f : act == 2 ? 1.0f / (1.0f + expf(-s[j])) : s[j];
        }
    }
}

/* x through n layers into y, the layers between them alternating over two scratch rows */
static void chain(const float *x, int64_t n, const int64_t *ints, const float *const *ptrs, float *scratch,
                  int64_t width, float *y) {
    const float *in = x;
    for (int64_t l = 0; l < n; l++) {
        float *out = l == n - 1 ? y : scratch + (l % 2) * width;
        affine(in, ints[3 * l], ints[3 * l + 1], ptrs[2 * l], ptrs[2 * l + 1], ints[3 * l + 2], out);
        in = out;
    }
}

int64_t mlp(const float *x, int64_t n_a, int64_t n_b, const int64_t *ints, const float *const *ptrs, int64_t width,
            float *scratch, float *y) {
    chain(x, n_a, ints, ptrs, scratch, width, y);
    if (n_b > 0) {
        float *gate = scratch + 2 * width;
        chain(x, n_b, ints + 3 * n_a, ptrs + 2 * n_a, scratch, width, gate);
        for (int64_t j = 0; j < ints[3 * n_a - 2]; j++) y[j] /= 1.0f + expf(-gate[j]);
    }
    return 0;
}
