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

#include <math.h>
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

/* ---- paged attention: query rows over packed rows walked in place through vLLM's block table ---------------------

   kv_paged_attend handles requests reqs[0..nreq) of a step in one call. Request r owns query rows qsl[r]..qsl[r+1]
   (n rows: its newest tokens) and lens[r] cached tokens (this step's included); query row j sits at position
   L - n + j and attends to tokens 0..L-n+j. Query head h*G+g reads KV head h. Token t's cell is
   cache + btab[r * bts + t / bs] * bstride + h * hstride + (t % bs) * cell (bytes); its key row starts at byte 0 of
   the cell, its value row at voff; a row is nbytes of codes (`bits` per code, the lookup table `lut`) followed, at
   byte scoff of the row, by its scale: kind 1 one fp16 per token (TurboQuant's norm), kind 2 nblk fp32 per blk
   channels (FP8), kind 0 none. e4m3: the 8-bit codes are FP8 e4m3 bytes and lut their 256 values (the AVX-512
   path converts them arithmetically instead of looking them up). q / out: float32 rows of Hkv*G heads of d channels (row strides qrs / ors elements),
   q already in the codec's basis (TurboQuant: rotated), out left in it. Scores are scaled by sm, the softmax is
   float32 with the row maximum subtracted, the mix normalised: attention equal to decode + softmax(q k^T) v to
   float tolerance, without copying or decoding the pages. */

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, ex = (h >> 10) & 0x1fu, man = h & 0x3ffu, f;
    float out;
    if (ex == 0) {  /* zero or subnormal: man * 2^-24 */
        out = (float)man * (1.0f / 16777216.0f);
        return (h & 0x8000u) ? -out : out;
    }
    f = ex == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((ex + 112u) << 23) | (man << 13));
    memcpy(&out, &f, 4);
    return out;
}

static inline float f32_at(const uint8_t *p) { float v; memcpy(&v, p, 4); return v; }

/* the scale of channel block c / blk of a row (1 without a scale) */
static inline float row_scale(const uint8_t *row, int kind, int scoff, int c, int blk) {
    if (kind == 1) return half_to_float(row + scoff);
    if (kind == 2) return f32_at(row + scoff + 4 * (c / blk));
    return 1.0f;
}

typedef struct {
    int d, bits, nbytes, kind, scoff, nblk, blk, voff, e4m3;
    const float *lut;
} paged_fmt;

/* portable: scores s[i][t] of nv query vectors qv[i][d] over the L key rows rp[t] */
static void pscore_scalar(const paged_fmt *f, int L, int nv, const uint8_t *const *rp, const float *qv, float sm,
                          float *s, float *y) {
    for (int t = 0; t < L; t++) {
        const uint8_t *row = rp[t];
        for (int j = 0; j < f->d; j++)
            y[j] = f->lut[code_at(row, f->nbytes, j, f->bits)] * row_scale(row, f->kind, f->scoff, j, f->blk);
        for (int i = 0; i < nv; i++) {
            float acc = 0.0f;
            for (int j = 0; j < f->d; j++) acc += qv[(long)i * f->d + j] * y[j];
            s[(long)i * L + t] = acc * sm;
        }
    }
}

/* portable: acc[i][d] = sum_t w[i][t] x~_t over the L value rows rp[t] + voff */
static void pmix_scalar(const paged_fmt *f, int L, int nv, const uint8_t *const *rp, const float *w, float *acc,
                        float *y) {
    memset(acc, 0, sizeof(float) * (size_t)nv * f->d);
    for (int t = 0; t < L; t++) {
        const uint8_t *row = rp[t] + f->voff;
        for (int j = 0; j < f->d; j++)
            y[j] = f->lut[code_at(row, f->nbytes, j, f->bits)] * row_scale(row, f->kind, f->scoff, j, f->blk);
        for (int i = 0; i < nv; i++) {
            float wi = w[(long)i * L + t];
            if (wi == 0.0f) continue;
            for (int j = 0; j < f->d; j++) acc[(long)i * f->d + j] += wi * y[j];
        }
    }
}

static void softmax_scalar(float *s, int n) {
    float m = s[0];
    for (int t = 1; t < n; t++) m = s[t] > m ? s[t] : m;
    float sum = 0.0f;
    for (int t = 0; t < n; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
    float inv = 1.0f / sum;
    for (int t = 0; t < n; t++) s[t] *= inv;
}

#ifdef __AVX512F__
/* exp(x) for x <= 0 (scores minus their maximum): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p the degree-6
   Taylor polynomial (relative error about 1e-7); below -87 it returns 0 (as expf underflows there). */
static inline __m512 exp512(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps((__mmask16)~tiny, _mm512_scalef_ps(p, n));
}

static void softmax512(float *s, int n) {
    __m512 mv = _mm512_set1_ps(-INFINITY);
    int t = 0;
    for (; t + 16 <= n; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + t));
    if (t < n) mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), (__mmask16)((1u << (n - t)) - 1u), s + t));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 sum = _mm512_setzero_ps();
    for (t = 0; t + 16 <= n; t += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), m));
        _mm512_storeu_ps(s + t, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (t < n) {
        __mmask16 k = (__mmask16)((1u << (n - t)) - 1u);
        __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), m)));
        _mm512_mask_storeu_ps(s + t, k, e);
        sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (t = 0; t + 16 <= n; t += 16) _mm512_storeu_ps(s + t, _mm512_mul_ps(_mm512_loadu_ps(s + t), inv));
    if (t < n) {
        __mmask16 k = (__mmask16)((1u << (n - t)) - 1u);
        _mm512_mask_storeu_ps(s + t, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + t), inv));
    }
}

/* 16 values of lane chunk ch of a row: wide (2/4 bits, lane order of lane_order), FP8 e4m3 bytes converted
   arithmetically (bits 9 here: the exponent rebased from 7 to 127, subnormals m * 2^-9; the same values as the
   table, without a gather), or natural order through the table (deq16) */
static inline __attribute__((always_inline)) __m512 chunk16(const uint8_t *row, int ch, const int bits, const int wide,
                                                            __m512 lut16, const float *lut) {
    if (bits == 9) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + ch * 16)));
        const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
        const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
        __m512 v = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23)));
        const __mmask16 sub = _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8));
        v = _mm512_mask_mul_ps(v, sub, _mm512_cvtepi32_ps(mag), _mm512_set1_ps(1.0f / 512.0f));
        return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
    }
    if (wide) {
        const int per = 8 / bits;
        return wide16(bytes16(row, (ch / per) * 16 * per, bits), ch % per, bits, lut16);
    }
    return deq16(row, ch * 16, bits, lut16, lut);
}

static inline __attribute__((always_inline)) int chunk_base(int ch, const int bits, const int wide) {
    return wide ? (ch / (8 / bits)) * 16 * (8 / bits) : ch * 16;
}

/* Sums of 16 vectors at once: lane i of the result is the sum of the lanes of v[HSLOT[i]] (four levels of
   shuffle-and-add, about 2 operations per vector instead of a reduction chain each). */
static const int HSLOT[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

static inline __attribute__((always_inline)) __m512 hsum16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[i], v[i + 8], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(a[i], a[i + 4], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[i], b[i + 2], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[i], b[i + 2], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* scores of ng (a constant after inlining: the loops over queries unroll, accumulators stay in registers) query
   vectors qq[ng][d] over the L key rows, into s[g * L + t] */
static inline __attribute__((always_inline)) void pscore_ng(const paged_fmt *f, const int bits, const int wide,
        const int ng, int L, const uint8_t *const *rp, const float *qq, float sm, float *s, __m512 lut16) {
    const int d = f->d, nch = d / 16, kind = f->kind, per_token = kind != 2 || f->nblk == 1;
    __m512 buf[MAXG][16];
    float st[16];
    for (int t0 = 0; t0 < L; t0 += 16) {  /* 16 tokens: their 16-lane partial sums, then one hsum16 per query */
        const int nt = L - t0 < 16 ? L - t0 : 16;
        for (int u = 0; u < 16; u++) {
            __m512 acc[MAXG];
            for (int g = 0; g < ng; g++) acc[g] = _mm512_setzero_ps();
            st[u] = 0.0f;
            if (u < nt) {
                const uint8_t *row = rp[t0 + u];
                for (int ch = 0; ch < nch; ch++) {
                    __m512 v = chunk16(row, ch, bits, wide, lut16, f->lut);
                    if (!per_token) v = _mm512_mul_ps(v, _mm512_set1_ps(f32_at(row + f->scoff + 4 * (chunk_base(ch, bits, wide) / f->blk))));
                    for (int g = 0; g < ng; g++) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qq + (long)g * d + ch * 16), v, acc[g]);
                }
                st[u] = sm * (per_token ? row_scale(row, kind, f->scoff, 0, f->blk) : 1.0f);
            }
            const int slot = HSLOT[u];
            for (int g = 0; g < ng; g++) buf[g][slot] = acc[g];
        }
        const __m512 stv = _mm512_loadu_ps(st);
        const __mmask16 k = (__mmask16)(nt == 16 ? 0xFFFFu : (1u << nt) - 1u);
        for (int g = 0; g < ng; g++) _mm512_mask_storeu_ps(s + (long)g * L + t0, k, _mm512_mul_ps(hsum16(buf[g]), stv));
    }
}

/* mixes of ng query vectors: acc[g][d] = sum_t w[g * L + t] x~_t over the L value rows (w holds the per-token
   value scales already: kind 1, or kind 2 with one block) */
static inline __attribute__((always_inline)) void pmix_ng(const paged_fmt *f, const int bits, const int wide,
        const int ng, int L, const uint8_t *const *rp, const float *w, float *accb, __m512 lut16) {
    const int d = f->d, nch = d / 16, per_token = f->kind != 2 || f->nblk == 1;
    for (int t0 = 0; t0 < L; t0 += TBLOCK) {
        const int t1 = t0 + TBLOCK < L ? t0 + TBLOCK : L;
        for (int ch = 0; ch < nch; ch++) {
            __m512 acc[MAXG];
            for (int g = 0; g < ng; g++) acc[g] = _mm512_loadu_ps(accb + (long)g * d + ch * 16);
            for (int t = t0; t < t1; t++) {
                const uint8_t *row = rp[t] + f->voff;
                __m512 v = chunk16(row, ch, bits, wide, lut16, f->lut);
                if (!per_token) v = _mm512_mul_ps(v, _mm512_set1_ps(f32_at(row + f->scoff + 4 * (chunk_base(ch, bits, wide) / f->blk))));
                for (int g = 0; g < ng; g++) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(w[(long)g * L + t]), v, acc[g]);
            }
            for (int g = 0; g < ng; g++) _mm512_storeu_ps(accb + (long)g * d + ch * 16, acc[g]);
        }
    }
}

static inline __attribute__((always_inline)) void pscore512(const paged_fmt *f, const int bits, const int wide, int L,
        int nv, const uint8_t *const *rp, const float *qv, float sm, float *s, __m512 lut16) {
    for (int g0 = 0; g0 < nv; g0 += MAXG) {
        const float *qq = qv + (long)g0 * f->d;
        float *sg = s + (long)g0 * L;
        switch (nv - g0 < MAXG ? nv - g0 : MAXG) {
#define NG(n) case n: pscore_ng(f, bits, wide, n, L, rp, qq, sm, sg, lut16); break
        NG(1); NG(2); NG(3); NG(4); NG(5); NG(6); NG(7); default: NG(8);
#undef NG
        }
    }
}

static inline __attribute__((always_inline)) void pmix512(const paged_fmt *f, const int bits, const int wide, int L,
        int nv, const uint8_t *const *rp, const float *w, float *accb, __m512 lut16) {
    memset(accb, 0, sizeof(float) * (size_t)nv * f->d);
    for (int g0 = 0; g0 < nv; g0 += MAXG) {
        const float *wg = w + (long)g0 * L;
        float *ag = accb + (long)g0 * f->d;
        switch (nv - g0 < MAXG ? nv - g0 : MAXG) {
#define NG(n) case n: pmix_ng(f, bits, wide, n, L, rp, wg, ag, lut16); break
        NG(1); NG(2); NG(3); NG(4); NG(5); NG(6); NG(7); default: NG(8);
#undef NG
        }
    }
}

static void paged_simd(const paged_fmt *f, int wide, int L, int nv, const uint8_t *const *rp, const float *qv,
                       float sm, float *s, float *accb, int phase) {
    float tab[16] = {0};
    if (f->bits <= 4) memcpy(tab, f->lut, sizeof(float) * (size_t)(1 << f->bits));
    const __m512 lut16 = _mm512_loadu_ps(tab);
#define PAGED(B, W) do {                                                  \
        if (phase == 0) pscore512(f, B, W, L, nv, rp, qv, sm, s, lut16);  \
        else pmix512(f, B, W, L, nv, rp, s, accb, lut16);                 \
        return;                                                           \
    } while (0)
    if (wide) { if (f->bits == 4) PAGED(4, 1); PAGED(2, 1); }
    if (f->e4m3) PAGED(9, 0);
    switch (f->bits) {
    case 1: PAGED(1, 0);
    case 2: PAGED(2, 0);
    case 3: PAGED(3, 0);
    case 4: PAGED(4, 0);
    default: PAGED(8, 0);
    }
#undef PAGED
}
#endif

int kv_paged_attend(int nreq, const int32_t *reqs, const int32_t *qsl, const int32_t *lens, const int32_t *btab,
                    long bts, const uint8_t *cache, long bstride, long hstride, int bs, long cell, int Hkv, int G,
                    int d, int bits, const float *lut, int e4m3, int nbytes, int kind, int scoff, int nblk, int blk,
                    int voff, const float *q, long qrs, float sm, float *out, long ors) {
    paged_fmt f = {d, bits, nbytes, kind, scoff, nblk, blk, voff, e4m3 && bits == 8, lut};
    int lmax = 0, nmax = 0;
    for (int k = 0; k < nreq; k++) {
        int r = reqs[k], n = qsl[r + 1] - qsl[r];
        if (lens[r] > lmax) lmax = lens[r];
        if (n > nmax) nmax = n;
    }
    if (lmax <= 0 || nmax <= 0) return 0;
    const int nvmax = nmax * G;
    int *perm = (int *)malloc(sizeof(int) * (size_t)d);
    for (int c = 0; c < d; c++) perm[c] = c;
#ifdef __AVX512F__
    int simd, wide;
    simd = d % 16 == 0 && (kind != 2 || nblk == 1 || blk % 16 == 0) && (bits <= 4 || bits == 8);
    wide = simd && (bits == 2 || bits == 4) && d % (16 * (8 / bits)) == 0
           && (kind != 2 || nblk == 1 || blk % (16 * (8 / bits)) == 0);
    if (wide) lane_order(d, bits, perm);
#endif
    const uint8_t **rp = (const uint8_t **)malloc(sizeof(uint8_t *) * (size_t)lmax);
    float *s = (float *)malloc(sizeof(float) * (size_t)nvmax * lmax);
    float *qv = (float *)malloc(sizeof(float) * (size_t)nvmax * d);
    float *accb = (float *)malloc(sizeof(float) * (size_t)nvmax * d);
    float *vs = (float *)malloc(sizeof(float) * (size_t)lmax);
    float *y = (float *)malloc(sizeof(float) * (size_t)d);
    if (!rp || !s || !qv || !accb || !vs || !y) {
        free(perm); free(rp); free(s); free(qv); free(accb); free(vs); free(y);
        return -1;
    }
    const int per_token = kind != 2 || nblk == 1;
    for (int k = 0; k < nreq; k++) {
        const int r = reqs[k], qs = qsl[r], n = qsl[r + 1] - qs, L = lens[r];
        if (n <= 0 || L <= 0) continue;
        const int nv = n * G;
        const int32_t *blocks = btab + (long)r * bts;
        for (int h = 0; h < Hkv; h++) {
            for (int t = 0; t < L; t++)
                rp[t] = cache + (long)blocks[t / bs] * bstride + (long)h * hstride + (long)(t % bs) * cell;
            for (int i = 0; i < nv; i++) {  /* vector i: query row i / G, head h * G + i % G */
                const float *src = q + (long)(qs + i / G) * qrs + (long)(h * G + i % G) * d;
                for (int c = 0; c < d; c++) qv[(long)i * d + c] = src[perm[c]];
            }
#ifdef __AVX512F__
            if (simd) paged_simd(&f, wide, L, nv, rp, qv, sm, s, accb, 0);
            else
#endif
            pscore_scalar(&f, L, nv, rp, qv, sm, s, y);
            if (per_token)
                for (int t = 0; t < L; t++) vs[t] = row_scale(rp[t] + voff, kind, scoff, 0, blk);
            for (int i = 0; i < nv; i++) {  /* causal: row j sees tokens 0 .. L - n + j */
                const int lim = L - n + i / G + 1;
                float *si = s + (long)i * L;
                if (lim < 1) { memset(si, 0, sizeof(float) * (size_t)L); continue; }
#ifdef __AVX512F__
                if (simd) softmax512(si, lim);
                else
#endif
                softmax_scalar(si, lim);
                if (per_token)
                    for (int t = 0; t < lim; t++) si[t] *= vs[t];
                for (int t = lim; t < L; t++) si[t] = 0.0f;
            }
#ifdef __AVX512F__
            if (simd) paged_simd(&f, wide, L, nv, rp, qv, sm, s, accb, 1);
            else
#endif
            {
                /* the portable mix applies per-token scales through the weights too: undo row_scale there */
                paged_fmt g = f;
                if (per_token) g.kind = 0;
                pmix_scalar(&g, L, nv, rp, s, accb, y);
            }
            for (int i = 0; i < nv; i++) {
                float *dst = out + (long)(qs + i / G) * ors + (long)(h * G + i % G) * d;
                for (int c = 0; c < d; c++) dst[perm[c]] = accb[(long)i * d + c];
            }
        }
    }
    free(perm); free(rp); free(s); free(qv); free(accb); free(vs); free(y);
    return 0;
}
