/* pairwise_sum (mlp.c): the sum of w floats (w a power of two) in pairs, short dependency chains instead of a serial
 * chain of w adds; overwrites x. prerank.serve.native.build prepends this file to the sources that use it. */
#include <stdint.h>
#include <string.h>

static inline float pairwise_sum(float *x, int w) {
    for (int s = w / 2; s > 0; s /= 2)
        for (int l = 0; l < s; l++) x[l] += x[l + s];
    return x[0];
}
