/* Vectors of W floats, for the kernels that put one candidate in each vector lane (rank_tower, sum_max_block) and
 * for mlp.c; prerank.serve.native.build prepends it to their source. transpose() gathers a block of W cache rows and
 * transposes it, so that vector f holds feature f of every candidate in the block. The cache rows are floats, or
 * bfloat16 (elem_t) where BF16 is defined nonzero: the vectors are floats either way. */
#include <stdint.h>
#include <string.h>

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

static inline vf splat(float x) { return x - (vf){0}; }

/* b > a ? b : a, lane by lane: one maxps where the vectors are a whole register (maxps(x, y) is x > y ? x : y, so
 * NaNs come out alike), a compare and a blend elsewhere */
#if defined(__AVX512F__) && W == 16
#include <immintrin.h>
static inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)b, (__m512)a); }
#elif defined(__AVX__) && W == 8
#include <immintrin.h>
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)b, (__m256)a); }
#else
static inline vf vmax(vf a, vf b) {
    vi gt = b > a;
    return (vf)((gt & (vi)b) | (~gt & (vi)a));
}
#endif

#if W == 16 && defined(__GNUC__) && !defined(__clang__)
/* 16 x 16 transpose in registers (GCC's __builtin_shuffle): four stages swap the off-diagonal blocks of
 * 8, 4, 2 and 1 lanes; about 3x faster than moving the floats one by one */
#define LANES(F, b) \
    { F(0, b), F(1, b), F(2, b), F(3, b), F(4, b), F(5, b), F(6, b), F(7, b), \
      F(8, b), F(9, b), F(10, b), F(11, b), F(12, b), F(13, b), F(14, b), F(15, b) }
#define FROM_FIRST(l, b) (((l) & (b)) ? 16 + (l) - (b) : (l))
#define FROM_SECOND(l, b) (((l) & (b)) ? 16 + (l) : (l) + (b))

/* swap the off-diagonal b x b blocks of every pair of rows (i, i + b) */
static inline void swap_blocks(vf *m, int b, vi first, vi second) {
    for (int i = 0; i < 16; i++)
        if (!(i & b)) {
            const vf x = m[i], y = m[i + b];
            m[i] = __builtin_shuffle(x, y, first);
            m[i + b] = __builtin_shuffle(x, y, second);
        }
}

static inline void transpose16(vf *m) {
    swap_blocks(m, 8, (vi)LANES(FROM_FIRST, 8), (vi)LANES(FROM_SECOND, 8));
    swap_blocks(m, 4, (vi)LANES(FROM_FIRST, 4), (vi)LANES(FROM_SECOND, 4));
    swap_blocks(m, 2, (vi)LANES(FROM_FIRST, 2), (vi)LANES(FROM_SECOND, 2));
    swap_blocks(m, 1, (vi)LANES(FROM_FIRST, 1), (vi)LANES(FROM_SECOND, 1));
}
#define TILE 16
#else
#define TILE 0
#endif

#if defined(BF16) && BF16
typedef uint16_t elem_t; /* bfloat16: the upper half of a float's bits */
static inline float elem_float(elem_t x) {
    const uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#else
typedef float elem_t;
static inline float elem_float(elem_t x) { return x; }
#endif

/* dst[f] (lane c) = src[rows[c]][f] for f < f_len */
static inline void transpose(vf *dst, const elem_t *src, int f_len, const int64_t *rows) {
    int f = 0;
#if TILE && defined(BF16) && BF16
    /* a 16 x 16 transpose of 32-bit pairs of bfloat16 moves two features at once (half the shuffles of floats);
     * each pair then splits into two float vectors by a shift and a mask: 13-16% faster for RankTower's kernel */
    for (; f + 2 * TILE <= f_len; f += 2 * TILE) {
        vf m[TILE];
        for (int c = 0; c < TILE; c++) memcpy(&m[c], src + rows[c] * f_len + f, sizeof(vf));
        transpose16(m);
        const vi high = (vi){0} - 0x10000; /* 0xffff0000: the upper bfloat16 of a pair */
        for (int l = 0; l < TILE; l++) {
            dst[f + 2 * l] = (vf)((vi)m[l] << 16);
            dst[f + 2 * l + 1] = (vf)((vi)m[l] & high);
        }
    }
#elif TILE
    for (; f + TILE <= f_len; f += TILE) {
        vf m[TILE];
        for (int c = 0; c < TILE; c++) memcpy(&m[c], src + rows[c] * f_len + f, sizeof(vf));
        transpose16(m);
        for (int l = 0; l < TILE; l++) dst[f + l] = m[l];
    }
#endif
    for (; f < f_len; f++) /* what is left, or everything where shuffles are not available */
        for (int c = 0; c < W; c++) dst[f][c] = elem_float(src[rows[c] * f_len + f]);
}

/* The cache rows of the block of W candidates from start (a short last block repeats its last row).
 * Returns how many of them are real candidates, or -1-i for the first candidate i whose row is outside
 * [0, num_rows). */
static inline int64_t block_rows(int64_t *block, const int64_t *rows, int64_t start, int64_t n, int64_t num_rows) {
    const int64_t valid = n - start < W ? n - start : W;
    for (int c = 0; c < W; c++) {
        block[c] = rows[start + (c < valid ? c : valid - 1)];
        if (block[c] < 0 || block[c] >= num_rows) return -1 - (start + c);
    }
    return valid;
}
