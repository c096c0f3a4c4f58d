/* Attention straight from packed codes: scores q . x~ and mixes sum_t w_t x~_t without decoding to a buffer.

   Every kvslim codec that attends from its codes stores a vector as codes c_j (bit-packed, `bits` per code, the
   little-endian bit stream of kvslim.quant.packing) that map to floats through a small table and a per-token scale
   per block of `blk` channels:  x~_j = lut[c_j] * scale[t, j / blk]  (TurboQuant: the centroids and the norm, in
   the rotated basis; FP8: the 256 e4m3 values and the block scales; KIVI: 0..2^b-1 and its scales).

   kv_score: out[h, g, t] = sum_j q[h, t / qgroup, g, j] * x~[h, t, j]
   kv_mix:   out[h, g, j] = sum_t w[h, g, t] * x~[h, t, j]

   Layouts (float32, uint8; strides in elements): q [H][nq][G][d] contiguous per head (head stride qhs),
   codes [H][T][nbytes] (head stride chs), scale [H][T][nblk] (head stride shs) or NULL (= 1), w [H][G][T]
   contiguous, out contiguous. Codes are dequantised 16 at a time in registers (AVX-512: a permute over a <= 16-entry
   table for 1..4 bits, a gather over the table for 8 bits); tokens are processed in blocks so the accumulators of the
   mix stay in registers. Without AVX-512 (or when d is not a multiple of 16) a portable scalar loop computes the
   same sums. The order of the float additions differs from a matmul's, so results match to float tolerance. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MAXG 8
#define TBLOCK 64

static inline unsigned code_at(const uint8_t *row, int nbytes, int j, int bits) {
    int bit = j * bits, byte = bit >> 3, off = bit & 7;
    unsigned v = row[byte];
    if (byte + 1 < nbytes) v |= (unsigned)row[byte + 1] << 8;
    return (v >> off) & ((1u << bits) - 1u);
}

static inline float scale_at(const float *sc, int j, int blk) { return sc ? sc[j / blk] : 1.0f; }

/* ---- portable path ----------------------------------------------------------------------------------------- */
static void score_scalar(int H, int G, int T, int d, int bits, const float *lut, const float *q, long qhs, int qgroup,
                         const uint8_t *codes, long chs, int nbytes, const float *scale, long shs, int nblk, int blk,
                         float *out) {
    float *y = (float *)malloc(sizeof(float) * (size_t)d);
    for (int h = 0; h < H; h++) {
        long qoff = 0;  /* t / qgroup * G * d, kept without a division per token */
        for (int t = 0, qleft = qgroup; t < T; t++, qleft--) {
            if (!qleft) { qleft = qgroup; qoff += (long)G * d; }
            const uint8_t *row = codes + h * chs + (long)t * nbytes;
            const float *sc = scale ? scale + h * shs + (long)t * nblk : NULL;
            for (int j = 0; j < d; j++) y[j] = lut[code_at(row, nbytes, j, bits)] * scale_at(sc, j, blk);
            const float *qq = q + h * qhs + qoff;
            for (int g = 0; g < G; g++) {
                float s = 0.0f;
                for (int j = 0; j < d; j++) s += qq[g * d + j] * y[j];
                out[((long)h * G + g) * T + t] = s;
            }
        }
    }
    free(y);
}

static void mix_scalar(int H, int G, int T, int d, int bits, const float *lut, const float *w, const uint8_t *codes,
                       long chs, int nbytes, const float *scale, long shs, int nblk, int blk, float *out) {
    float *y = (float *)malloc(sizeof(float) * (size_t)d);
    for (int h = 0; h < H; h++) {
        float *o = out + (long)h * G * d;
        memset(o, 0, sizeof(float) * (size_t)G * d);
        for (int t = 0; t < T; t++) {
            const uint8_t *row = codes + h * chs + (long)t * nbytes;
            const float *sc = scale ? scale + h * shs + (long)t * nblk : NULL;
            for (int j = 0; j < d; j++) y[j] = lut[code_at(row, nbytes, j, bits)] * scale_at(sc, j, blk);
            for (int g = 0; g < G; g++) {
                float wg = w[((long)h * G + g) * T + t];
                for (int j = 0; j < d; j++) o[g * d + j] += wg * y[j];
            }
        }
    }
    free(y);
}

#ifdef __AVX512F__
/* 16 codes starting at code j0 (j0 % 16 == 0) of a row, as floats through the table. */
static inline __attribute__((always_inline)) __m512 deq16(const uint8_t *row, int j0, int bits, __m512 lut16, const float *lut) {
    if (bits == 8) {
        __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + j0)));
        return _mm512_i32gather_ps(idx, lut, 4);
    }
    if (bits == 1) {
        uint16_t m;
        memcpy(&m, row + j0 / 8, 2);
        return _mm512_mask_blend_ps((__mmask16)m, _mm512_set1_ps(lut[0]), _mm512_set1_ps(lut[1]));
    }
    uint64_t word = 0;
    const uint8_t *src = row + (j0 * bits) / 8;
    if (bits == 4) memcpy(&word, src, 8);
    else if (bits == 2) memcpy(&word, src, 4);
    else if (bits == 1) memcpy(&word, src, 2);
    else { uint32_t a; uint16_t c; memcpy(&a, src, 4); memcpy(&c, src + 4, 2); word = a | ((uint64_t)c << 32); }
    const long long b = bits;
    const __m512i sh_lo = _mm512_set_epi64(7 * b, 6 * b, 5 * b, 4 * b, 3 * b, 2 * b, b, 0);
    const __m512i sh_hi = _mm512_set_epi64(15 * b, 14 * b, 13 * b, 12 * b, 11 * b, 10 * b, 9 * b, 8 * b);
    __m512i wv = _mm512_set1_epi64((long long)word);
    __m512i mask = _mm512_set1_epi64((long long)((1u << bits) - 1u));
    __m512i lo = _mm512_and_si512(_mm512_srlv_epi64(wv, sh_lo), mask);
    __m512i hi = _mm512_and_si512(_mm512_srlv_epi64(wv, sh_hi), mask);
    __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)), _mm512_cvtepi64_epi32(hi), 1);
    return _mm512_permutexvar_ps(idx, lut16);
}

/* Whole-byte widths (2, 4 bits: `per` = 8 / bits codes per byte): 16 bytes hold 16 * per codes; shifting the 16
   bytes (one per lane) by k * bits gives codes per * i + k in lane i. Attention is order-free over channels, so the
   queries are permuted once per call into this lane order and the mixes permuted back: 2 ops per 16 codes instead of
   a shift-and-pack per 16. `perm[c]` is the channel held at lane position c. */
static int wide_ok(int d, int bits, int blk, const float *scale) {
    int span = 16 * (8 / bits);
    return (bits == 2 || bits == 4) && d % span == 0 && (!scale || blk % span == 0);
}

static void lane_order(int d, int bits, int *perm) {
    int per = 8 / bits, span = 16 * per;
    for (int c0 = 0; c0 < d; c0 += span)
        for (int k = 0; k < per; k++)
            for (int i = 0; i < 16; i++) perm[c0 + k * 16 + i] = c0 + per * i + k;
}

static inline __attribute__((always_inline)) __m512i bytes16(const uint8_t *row, int c0, int bits) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + c0 * bits / 8)));
}

static inline __attribute__((always_inline)) __m512 wide16(__m512i b, int k, int bits, __m512 lut16) {
    __m512i idx = _mm512_and_si512(_mm512_srli_epi32(b, (unsigned)(k * bits)), _mm512_set1_epi32((1 << bits) - 1));
    return _mm512_permutexvar_ps(idx, lut16);
}

static inline __attribute__((always_inline)) void score_wide(int H, int G, int T, int d, const int bits,
        const float *lut, const float *q, long qhs, int qgroup, const uint8_t *codes, long chs, int nbytes,
        const float *scale, long shs, int nblk, int blk, float *out) {
    const int per = 8 / bits, span = 16 * per;
    float tab[16] = {0};
    memcpy(tab, lut, sizeof(float) * (size_t)(1 << bits));
    const __m512 lut16 = _mm512_loadu_ps(tab);
    int *perm = (int *)malloc(sizeof(int) * (size_t)d);
    lane_order(d, bits, perm);
    int nq = (T + qgroup - 1) / qgroup;
    float *qp = (float *)malloc(sizeof(float) * (size_t)nq * G * d);
    const int per_token = nblk == 1 || !scale;
    for (int h = 0; h < H; h++) {
        const float *qh = q + h * qhs;
        for (long r = 0; r < (long)nq * G; r++)
            for (int c = 0; c < d; c++) qp[r * d + c] = qh[r * d + perm[c]];
        for (int g0 = 0; g0 < G; g0 += MAXG) {
            int ng = G - g0 < MAXG ? G - g0 : MAXG;
            long qoff = 0;  /* t / qgroup * G * d, kept without a division per token */
            for (int t = 0, qleft = qgroup; t < T; t++, qleft--) {
                if (!qleft) { qleft = qgroup; qoff += (long)G * d; }
                const uint8_t *row = codes + h * chs + (long)t * nbytes;
                const float *sc = scale ? scale + h * shs + (long)t * nblk : NULL;
                const float *qq = qp + qoff + (long)g0 * d;
                __m512 acc[MAXG];
                for (int g = 0; g < ng; g++) acc[g] = _mm512_setzero_ps();
                for (int c0 = 0; c0 < d; c0 += span) {
                    __m512i b = bytes16(row, c0, bits);
                    __m512 sv = per_token ? _mm512_set1_ps(1.0f) : _mm512_set1_ps(sc[c0 / blk]);
                    for (int k = 0; k < per; k++) {
                        __m512 v = wide16(b, k, bits, lut16);
                        if (!per_token) v = _mm512_mul_ps(v, sv);
                        for (int g = 0; g < ng; g++)
                            acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qq + g * d + c0 + k * 16), v, acc[g]);
                    }
                }
                float s1 = (per_token && sc) ? sc[0] : 1.0f;
                for (int g = 0; g < ng; g++) out[((long)h * G + g0 + g) * T + t] = _mm512_reduce_add_ps(acc[g]) * s1;
            }
        }
    }
    free(qp);
    free(perm);
}

static inline __attribute__((always_inline)) void mix_wide(int H, int G, int T, int d, const int bits,
        const float *lut, const float *w, const uint8_t *codes, long chs, int nbytes, const float *scale, long shs,
        int nblk, int blk, float *out) {
    const int per = 8 / bits, span = 16 * per;
    float tab[16] = {0};
    memcpy(tab, lut, sizeof(float) * (size_t)(1 << bits));
    const __m512 lut16 = _mm512_loadu_ps(tab);
    int *perm = (int *)malloc(sizeof(int) * (size_t)d);
    lane_order(d, bits, perm);
    float *acc_buf = (float *)malloc(sizeof(float) * (size_t)G * d);
    for (int h = 0; h < H; h++) {
        memset(acc_buf, 0, sizeof(float) * (size_t)G * d);
        for (int t0 = 0; t0 < T; t0 += TBLOCK) {
            int t1 = t0 + TBLOCK < T ? t0 + TBLOCK : T;
            for (int g0 = 0; g0 < G; g0 += MAXG) {
                int ng = G - g0 < MAXG ? G - g0 : MAXG;
                for (int c0 = 0; c0 < d; c0 += span) {
                    for (int k = 0; k < per; k++) {
                        __m512 acc[MAXG];
                        for (int g = 0; g < ng; g++) acc[g] = _mm512_loadu_ps(acc_buf + (g0 + g) * d + c0 + k * 16);
                        for (int t = t0; t < t1; t++) {
                            const uint8_t *row = codes + h * chs + (long)t * nbytes;
                            __m512 v = wide16(bytes16(row, c0, bits), k, bits, lut16);
                            if (scale) v = _mm512_mul_ps(v, _mm512_set1_ps(scale[h * shs + (long)t * nblk + c0 / blk]));
                            for (int g = 0; g < ng; g++)
                                acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(w[((long)h * G + g0 + g) * T + t]), v, acc[g]);
                        }
                        for (int g = 0; g < ng; g++) _mm512_storeu_ps(acc_buf + (g0 + g) * d + c0 + k * 16, acc[g]);
                    }
                }
            }
        }
        float *o = out + (long)h * G * d;
        for (int g = 0; g < G; g++)
            for (int c = 0; c < d; c++) o[g * d + perm[c]] = acc_buf[g * d + c];
    }
    free(acc_buf);
    free(perm);
}

static inline __attribute__((always_inline)) void score_avx512(int H, int G, int T, int d, int bits, const float *lut, const float *q, long qhs, int qgroup,
                         const uint8_t *codes, long chs, int nbytes, const float *scale, long shs, int nblk, int blk,
                         float *out) {
    __m512 lut16 = _mm512_setzero_ps();
    if (bits <= 4) {
        float tab[16] = {0};
        memcpy(tab, lut, sizeof(float) * (size_t)(1 << bits));
        lut16 = _mm512_loadu_ps(tab);
    }
    const int per_token = nblk == 1 || !scale;  /* one scale per token: apply it to the sum */
    for (int h = 0; h < H; h++) {
        for (int g0 = 0; g0 < G; g0 += MAXG) {
            int ng = G - g0 < MAXG ? G - g0 : MAXG;
            long qoff = 0;  /* t / qgroup * G * d, kept without a division per token */
            for (int t = 0, qleft = qgroup; t < T; t++, qleft--) {
                if (!qleft) { qleft = qgroup; qoff += (long)G * d; }
                const uint8_t *row = codes + h * chs + (long)t * nbytes;
                const float *sc = scale ? scale + h * shs + (long)t * nblk : NULL;
                const float *qq = q + h * qhs + qoff + (long)g0 * d;
                __m512 acc[MAXG];
                for (int g = 0; g < ng; g++) acc[g] = _mm512_setzero_ps();
                for (int j0 = 0; j0 < d; j0 += 16) {
                    __m512 v = deq16(row, j0, bits, lut16, lut);
                    if (!per_token) v = _mm512_mul_ps(v, _mm512_set1_ps(sc[j0 / blk]));
                    for (int g = 0; g < ng; g++) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qq + g * d + j0), v, acc[g]);
                }
                float s1 = (per_token && sc) ? sc[0] : 1.0f;
                for (int g = 0; g < ng; g++) out[((long)h * G + g0 + g) * T + t] = _mm512_reduce_add_ps(acc[g]) * s1;
            }
        }
    }
}

static inline __attribute__((always_inline)) void mix_avx512(int H, int G, int T, int d, int bits, const float *lut, const float *w, const uint8_t *codes,
                       long chs, int nbytes, const float *scale, long shs, int nblk, int blk, float *out) {
    __m512 lut16 = _mm512_setzero_ps();
    if (bits <= 4) {
        float tab[16] = {0};
        memcpy(tab, lut, sizeof(float) * (size_t)(1 << bits));
        lut16 = _mm512_loadu_ps(tab);
    }
    for (int h = 0; h < H; h++) {
        float *o = out + (long)h * G * d;
        memset(o, 0, sizeof(float) * (size_t)G * d);
        for (int t0 = 0; t0 < T; t0 += TBLOCK) {
            int t1 = t0 + TBLOCK < T ? t0 + TBLOCK : T;
            for (int g0 = 0; g0 < G; g0 += MAXG) {
                int ng = G - g0 < MAXG ? G - g0 : MAXG;
                for (int j0 = 0; j0 < d; j0 += 16) {
                    __m512 acc[MAXG];
                    for (int g = 0; g < ng; g++) acc[g] = _mm512_loadu_ps(o + (g0 + g) * d + j0);
                    for (int t = t0; t < t1; t++) {
                        const uint8_t *row = codes + h * chs + (long)t * nbytes;
                        __m512 v = deq16(row, j0, bits, lut16, lut);
                        if (scale) v = _mm512_mul_ps(v, _mm512_set1_ps(scale[h * shs + (long)t * nblk + j0 / blk]));
                        for (int g = 0; g < ng; g++)
                            acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(w[((long)h * G + g0 + g) * T + t]), v, acc[g]);
                    }
                    for (int g = 0; g < ng; g++) _mm512_storeu_ps(o + (g0 + g) * d + j0, acc[g]);
                }
            }
        }
    }
}
#endif

#ifdef __AVX512F__
static int simd_ok(int d, int bits, int blk) { return d % 16 == 0 && blk % 16 == 0 && (bits <= 4 || bits == 8); }
#endif

int kv_has_simd(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

void kv_score(int H, int G, int T, int d, int bits, const float *lut, const float *q, long qhs, int qgroup,
              const uint8_t *codes, long chs, int nbytes, const float *scale, long shs, int nblk, int blk, float *out) {
#ifdef __AVX512F__
    if (wide_ok(d, bits, blk, scale)) {
        if (bits == 4) score_wide(H, G, T, d, 4, lut, q, qhs, qgroup, codes, chs, nbytes, scale, shs, nblk, blk, out);
        else score_wide(H, G, T, d, 2, lut, q, qhs, qgroup, codes, chs, nbytes, scale, shs, nblk, blk, out);
        return;
    }
    if (simd_ok(d, bits, blk)) {
#define SCORE(B) score_avx512(H, G, T, d, B, lut, q, qhs, qgroup, codes, chs, nbytes, scale, shs, nblk, blk, out)
        switch (bits) {  /* constant widths, so each copy unpacks with fixed shifts and copies */
        case 1: SCORE(1); return;
        case 2: SCORE(2); return;
        case 3: SCORE(3); return;
        case 4: SCORE(4); return;
        default: SCORE(8); return;
        }
#undef SCORE
    }
#endif
    score_scalar(H, G, T, d, bits, lut, q, qhs, qgroup, codes, chs, nbytes, scale, shs, nblk, blk, out);
}

void kv_mix(int H, int G, int T, int d, int bits, const float *lut, const float *w, const uint8_t *codes, long chs,
            int nbytes, const float *scale, long shs, int nblk, int blk, float *out) {
#ifdef __AVX512F__
    if (wide_ok(d, bits, blk, scale)) {
        if (bits == 4) mix_wide(H, G, T, d, 4, lut, w, codes, chs, nbytes, scale, shs, nblk, blk, out);
        else mix_wide(H, G, T, d, 2, lut, w, codes, chs, nbytes, scale, shs, nblk, blk, out);
        return;
    }
    if (simd_ok(d, bits, blk)) {
#define MIX(B) mix_avx512(H, G, T, d, B, lut, w, codes, chs, nbytes, scale, shs, nblk, blk, out)
        switch (bits) {
        case 1: MIX(1); return;
        case 2: MIX(2); return;
        case 3: MIX(3); return;
        case 4: MIX(4); return;
        default: MIX(8); return;
        }
#undef MIX
    }
#endif
    mix_scalar(H, G, T, d, bits, lut, w, codes, chs, nbytes, scale, shs, nblk, blk, out);
}

/* k-th largest value of each of `rows` rows of n floats (row stride `stride`): what sorting the row descending puts
   at index k - 1 (for top-k masks at prefill: x >= out[r]). A bisection over the order-preserving integer keys of
   the floats: up to 32 counting passes, each a branch-free loop the compiler vectorises, stopping at the first
   threshold that exactly k keys reach (then the answer is the smallest of those keys) (a quickselect mispredicts most
   of its branches on scores and is no faster than torch.topk). */
static inline uint32_t order_key(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

void kv_kth_largest(int rows, int n, const float *x, long stride, int k, float *out) {
    uint32_t *key = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)n);
    for (int r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        for (int i = 0; i < n; i++) key[i] = order_key(row[i]);
        uint64_t lo = 0, hi = 0xFFFFFFFFu;  /* the largest v with #(key >= v) >= k */
        while (lo < hi) {
            uint32_t mid = (uint32_t)((lo + hi + 1) / 2);
            int c = 0;
            for (int i = 0; i < n; i++) c += key[i] >= mid;
            if (c == k) {  /* exactly k keys >= mid: the answer is the smallest of them (one more pass, not ~15) */
                uint32_t m = 0xFFFFFFFFu;
                for (int i = 0; i < n; i++) { uint32_t v = key[i] >= mid ? key[i] : 0xFFFFFFFFu; m = v < m ? v : m; }
                lo = m;
                break;
            }
            if (c >= k) lo = mid;
            else hi = mid - 1;
        }
        uint32_t v = (uint32_t)lo, u = (v & 0x80000000u) ? (v & 0x7FFFFFFFu) : ~v;
        memcpy(out + r, &u, 4);
    }
    free(key);
}

/* kv_bucket: out[i] = #{j : y[i] > thr[j]} (nt <= 255 float32 thresholds): the cell index of torch.bucketize(y, thr)
   for sorted thresholds, a value equal to a threshold going to the lower cell; exactly what one compare-and-add
   pass per threshold gives (kvslim.quant.codebooks.bucket), in one pass over y per block of values. */
void kv_bucket(long n, const float *y, int nt, const float *thr, uint8_t *out) {
    for (long a = 0; a < n; a += 4096) {
        long e = a + 4096 < n ? a + 4096 : n;
        memset(out + a, 0, (size_t)(e - a));
        for (int j = 0; j < nt; j++) {
            const float t = thr[j];
            for (long i = a; i < e; i++) out[i] += (uint8_t)(y[i] > t);
        }
    }
}
