/* Decode attention on x86 CPUs with AVX2 and FMA (AVX-512 BF16 for bf16 where present): one query per
 * sequence over its K/V rows, for the decode scratch (engine/decode_scratch.py). Compiled at first use
 * by engine/native_kernels.py.
 *
 *   q   [B, H, D]          b, h strided; D contiguous
 *   k,v [B, KVH, S, D]     b, h, position strided; D contiguous; row b attends keys [0, lengths[b])
 *   out [B, H, D]          contiguous
 *
 * One task per (sequence, KV head): its H/KVH query heads read that head's keys and values once, in
 * one streaming pass each, with fp32 scores, softmax and accumulation (as SDPA's CPU kernel does).
 * Why not SDPA: its CPU flash kernel sets up a tiled GEMM per (sequence, head) sized for many query
 * rows; a decode has one to a handful, and the set-up costs as much as reading the K/V.
 *
 *   scores:  8 keys at a time -> 8 dot products per query head, summed across lanes together (hsum8)
 *   softmax: e^(s - max) by a degree-6 polynomial of 2^f (relative error ~2e-7)
 *   values:  acc[g] += weight[g][p] * v[p], one pass over the values
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEAD_DIM 256
#define MAX_GROUP 16
#define AVX2 __attribute__((target("avx2,fma")))

int avx2_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

AVX2 static inline __m256 load8(const void *base, int64_t at, int is_bf16) {
    if (!is_bf16) return _mm256_loadu_ps((const float *)base + at);
    const __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + at));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

/* Lane sums of eight vectors, as one vector: result[j] = sum(a[j]). */
AVX2 static inline __m256 hsum8(const __m256 *a) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* 2^f on [-0.5, 0.5], highest power first (relative error ~2e-7). */
static const float EXP2_POLY[7] = {1.5353362e-4f, 1.3398874e-3f, 9.6182578e-3f, 5.5503264e-2f,
                                   2.4022652e-1f, 6.9314718e-1f, 1.0f};

/* e^x, 8 at a time: 2^(x log2 e) as 2^n (exponent bits) times EXP2_POLY(f), f in [-0.5, 0.5]; 0 below e^-87
 * and +inf above e^88, as float's own. */
AVX2 static inline __m256 exp8(__m256 x) {
    const __m256 scaled = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504f));
    const __m256 t = _mm256_min_ps(_mm256_max_ps(scaled, _mm256_set1_ps(-126.0f)), _mm256_set1_ps(127.0f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < 7; i++) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[i]));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    const __m256 finite = _mm256_and_ps(result, _mm256_cmp_ps(t, _mm256_set1_ps(-126.0f), _CMP_GT_OQ));
    return _mm256_blendv_ps(finite, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(scaled, _mm256_set1_ps(128.0f), _CMP_GE_OQ));
}

/* One task's scratch: queries (fp32, pre-scaled), 8 converted keys, the output accumulators. */
typedef struct {
    float queries[MAX_GROUP][MAX_HEAD_DIM];
    float keys[8][MAX_HEAD_DIM];
    float acc[MAX_GROUP][MAX_HEAD_DIM];
} TaskBuffers;

AVX2 static void scores_of(TaskBuffers *buf, const void *k, int64_t k_stride_p, int64_t length, int groups,
                           int chunks, int is_bf16, float *scores) {
    const int64_t element = is_bf16 ? 2 : 4;
    for (int64_t p0 = 0; p0 < length; p0 += 8) {
        const int rows = length - p0 < 8 ? (int)(length - p0) : 8;
        for (int j = 0; j < 8; j++) /* the block after next: the hardware prefetcher ramps up too slowly */
            for (int64_t byte = 0; byte < chunks * 8 * element; byte += 64)
                _mm_prefetch((const char *)k + ((p0 + 16 + j) * k_stride_p) * element + byte, _MM_HINT_T0);
        for (int j = 0; j < 8; j++)
            for (int c = 0; c < chunks; c++)
                _mm256_storeu_ps(buf->keys[j] + 8 * c,
                                 j < rows ? load8(k, (p0 + j) * k_stride_p + 8 * c, is_bf16) : _mm256_setzero_ps());
        for (int g = 0; g < groups; g++) {
            __m256 dots[8]; /* eight independent FMA chains: one chain would wait on each FMA's latency */
            for (int j = 0; j < 8; j++) dots[j] = _mm256_setzero_ps();
            for (int c = 0; c < chunks; c++) {
                const __m256 query = _mm256_loadu_ps(buf->queries[g] + 8 * c);
                for (int j = 0; j < 8; j++)
                    dots[j] = _mm256_fmadd_ps(query, _mm256_loadu_ps(buf->keys[j] + 8 * c), dots[j]);
            }
            float eight[8];
            _mm256_storeu_ps(eight, hsum8(dots));
            memcpy(scores + g * length + p0, eight, sizeof(float) * rows);
        }
    }
}

/* Softmax of one query head's scores in place (unnormalised); returns 1 / their sum. */
AVX2 static float softmax_of(float *s, int64_t length) {
    __m256 tops = _mm256_set1_ps(s[0]);
    int64_t p = 0;
    for (; p + 8 <= length; p += 8) tops = _mm256_max_ps(tops, _mm256_loadu_ps(s + p));
    float lanes[8], top = s[0];
    _mm256_storeu_ps(lanes, tops);
    for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
    for (; p < length; p++) top = s[p] > top ? s[p] : top;
    const __m256 top8 = _mm256_set1_ps(top);
    __m256 total8 = _mm256_setzero_ps();
    for (p = 0; p + 8 <= length; p += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + p), top8));
        _mm256_storeu_ps(s + p, e);
        total8 = _mm256_add_ps(total8, e);
    }
    float total = 0.0f;
    _mm256_storeu_ps(lanes, total8);
    for (int j = 0; j < 8; j++) total += lanes[j];
    if (p < length) {
        float tail[8] = {0};
        memcpy(tail, s + p, sizeof(float) * (length - p));
        _mm256_storeu_ps(lanes, exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), top8)));
        for (int64_t j = 0; j < length - p; j++) total += (s[p + j] = lanes[j]);
    }
    return 1.0f / total;
}

AVX2 static void attend(TaskBuffers *buf, const void *k, const void *v, int64_t k_stride_p, int64_t v_stride_p,
                        int64_t length, int groups, int head_dim, int is_bf16, float *scores, float *inverse) {
    const int chunks = head_dim / 8;
    scores_of(buf, k, k_stride_p, length, groups, chunks, is_bf16, scores);
    for (int g = 0; g < groups; g++) inverse[g] = softmax_of(scores + g * length, length);
    /* 8 vectors of a query head's output in registers, one pass over the values each: the values of a
     * task (a few KB per head) stay in L1 between passes. */
    const int64_t element = is_bf16 ? 2 : 4;
    for (int g = 0; g < groups; g++) {
        const float *weights = scores + g * length;
        for (int c0 = 0; c0 < chunks; c0 += 8) {
            const int width = chunks - c0 < 8 ? chunks - c0 : 8;
            __m256 acc[8];
            for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
            for (int64_t p = 0; p < length; p++) {
                if (g == 0 && c0 == 0)
                    for (int64_t byte = 0; byte < head_dim * element; byte += 64)
                        _mm_prefetch((const char *)v + ((p + 16) * v_stride_p) * element + byte, _MM_HINT_T0);
                const __m256 weight = _mm256_set1_ps(weights[p]);
                for (int c = 0; c < 8; c++)
                    if (c < width)
                        acc[c] = _mm256_fmadd_ps(weight, load8(v, p * v_stride_p + 8 * (c0 + c), is_bf16), acc[c]);
            }
            for (int c = 0; c < width; c++) _mm256_storeu_ps(buf->acc[g] + 8 * (c0 + c), acc[c]);
        }
    }
}

/* -- bf16 on AVX-512 BF16 (Sapphire Rapids and later, Zen 4 and later): dot products on bf16 pairs as
 * loaded (vdpbf16ps: exact products, fp32 sums), values widened once per row, a query head's output in
 * registers. For head_dim a multiple of 64 and up to 4 query heads per KV head; the rest take the AVX2
 * path. Scores are (q . k) * scale, as SDPA computes them. */
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))
#define MAX_GROUP_512 4

int avx512_bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

/* Lane sums of sixteen vectors, as one vector: result[j] = sum(a[j]). Pairs, then quads within 128-bit lanes,
 * then across the four lanes. */
AVX512BF16 static inline __m512 hsum16(const __m512 *a) {
    __m512 pairs[8], quads[4];
    for (int i = 0; i < 8; i++)
        pairs[i] =
            _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d x = _mm512_castps_pd(pairs[2 * i]), y = _mm512_castps_pd(pairs[2 * i + 1]);
        quads[i] =
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                     _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
    const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                      _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xDD));
}

AVX512BF16 static void attend_bf16_512(const uint16_t *q, int64_t q_stride_h, const uint16_t *k, const uint16_t *v,
                                       int64_t k_stride_p, int64_t v_stride_p, int64_t length, int groups,
                                       int head_dim, float scale, float *scores, float acc[][MAX_HEAD_DIM],
                                       float *inverse) {
    const int pairs = head_dim / 32; /* 32 bf16 per 512-bit load */
    __m512bh queries[MAX_GROUP_512][MAX_HEAD_DIM / 32];
    for (int g = 0; g < groups; g++)
        for (int c = 0; c < pairs; c++) queries[g][c] = (__m512bh)_mm512_loadu_si512(q + g * q_stride_h + 32 * c);
    for (int64_t p0 = 0; p0 < length; p0 += 16) { /* 16 keys: their lane sums come out together (hsum16) */
        const int rows = length - p0 < 16 ? (int)(length - p0) : 16;
        for (int j = 0; j < 16; j++)
            for (int c = 0; c < pairs; c++)
                _mm_prefetch((const char *)(k + (p0 + 32 + j) * k_stride_p + 32 * c), _MM_HINT_T0);
        for (int g = 0; g < groups; g++) {
            __m512 dots[16];
            for (int j = 0; j < 16; j++) {
                __m512 dot = _mm512_setzero_ps();
                if (j < rows)
                    for (int c = 0; c < pairs; c++)
                        dot = _mm512_dpbf16_ps(dot, queries[g][c],
                                               (__m512bh)_mm512_loadu_si512(k + (p0 + j) * k_stride_p + 32 * c));
                dots[j] = dot;
            }
            float sixteen[16];
            _mm512_storeu_ps(sixteen, _mm512_mul_ps(hsum16(dots), _mm512_set1_ps(scale)));
            memcpy(scores + g * length + p0, sixteen, sizeof(float) * rows);
        }
    }
    for (int g = 0; g < groups; g++) inverse[g] = softmax_of(scores + g * length, length);
    for (int slab = 0; slab < head_dim; slab += 64) { /* 64 dims: 4 vectors per query head, all in registers */
        __m512 sums[MAX_GROUP_512][4];
        for (int g = 0; g < MAX_GROUP_512; g++)
            for (int c = 0; c < 4; c++) sums[g][c] = _mm512_setzero_ps();
        for (int64_t p = 0; p < length; p++) {
            const uint16_t *value = v + p * v_stride_p + slab;
            _mm_prefetch((const char *)(value + 16 * v_stride_p), _MM_HINT_T0);
            _mm_prefetch((const char *)(value + 16 * v_stride_p + 32), _MM_HINT_T0);
            __m512 row[4];
            for (int c = 0; c < 4; c++)
                row[c] = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(value + 16 * c)));
            for (int g = 0; g < MAX_GROUP_512; g++) {
                if (g >= groups) break;
                const __m512 weight = _mm512_set1_ps(scores[g * length + p]);
                for (int c = 0; c < 4; c++) sums[g][c] = _mm512_fmadd_ps(weight, row[c], sums[g][c]);
            }
        }
        for (int g = 0; g < groups; g++)
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc[g] + slab + 16 * c, sums[g][c]);
    }
}

static inline float bf16_to_float(uint16_t half) {
    const uint32_t bits = (uint32_t)half << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint16_t float_to_bf16(float value) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* Strides in elements; is_bf16: bfloat16 tensors, else float32; allow_avx512: 0 keeps to the AVX2 path. Returns 0; -1 if the CPU lacks AVX2/FMA,
 * a shape exceeds the fixed buffers (head_dim a multiple of 8 up to 256, up to 16 query heads per KV
 * head) or memory ran out: the caller checks the first two before calling. */
int decode_attention(int is_bf16, const void *q, int64_t q_stride_b, int64_t q_stride_h, const void *k,
                     int64_t k_stride_b, int64_t k_stride_h, int64_t k_stride_p, const void *v, int64_t v_stride_b,
                     int64_t v_stride_h, int64_t v_stride_p, const int64_t *lengths, int64_t batch, int heads,
                     int kv_heads, int head_dim, float scale, void *out, int threads, int allow_avx512) {
    const int groups = kv_heads > 0 ? heads / kv_heads : 0;
    if (!avx2_supported() || head_dim % 8 || head_dim > MAX_HEAD_DIM || groups < 1 ||
        groups > MAX_GROUP || groups * kv_heads != heads)
        return -1;
    int64_t longest = 1;
    for (int64_t b = 0; b < batch; b++) longest = lengths[b] > longest ? lengths[b] : longest;
    const int wide = allow_avx512 && is_bf16 && head_dim % 64 == 0 && groups <= MAX_GROUP_512 && avx512_bf16_supported();
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * groups * longest);
        TaskBuffers *buf = aligned_alloc(64, sizeof(TaskBuffers));
        float inverse[MAX_GROUP];
        failed = scores == NULL || buf == NULL;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < batch * kv_heads; task++) {
            const int64_t b = task / kv_heads, length = lengths[b];
            const int h = (int)(task % kv_heads);
            if (failed || length <= 0) continue;
            const size_t element = is_bf16 ? 2 : 4;
            if (wide) {
                attend_bf16_512((const uint16_t *)q + b * q_stride_b + (int64_t)h * groups * q_stride_h, q_stride_h,
                                (const uint16_t *)k + b * k_stride_b + h * k_stride_h,
                                (const uint16_t *)v + b * v_stride_b + h * v_stride_h, k_stride_p, v_stride_p, length,
                                groups, head_dim, scale, scores, buf->acc, inverse);
            } else {
                for (int g = 0; g < groups; g++) {
                    const int64_t at = b * q_stride_b + (int64_t)(h * groups + g) * q_stride_h;
                    for (int d = 0; d < head_dim; d++)
                        buf->queries[g][d] = scale * (is_bf16 ? bf16_to_float(((const uint16_t *)q)[at + d])
                                                              : ((const float *)q)[at + d]);
                }
                attend(buf, (const char *)k + (b * k_stride_b + h * k_stride_h) * element,
                       (const char *)v + (b * v_stride_b + h * v_stride_h) * element, k_stride_p, v_stride_p, length,
                       groups, head_dim, is_bf16, scores, inverse);
            }
            for (int g = 0; g < groups; g++) {
                const int64_t at = (b * heads + h * groups + g) * head_dim;
                for (int d = 0; d < head_dim; d++) {
                    const float result = buf->acc[g][d] * inverse[g];
                    if (is_bf16)
                        ((uint16_t *)out)[at + d] = float_to_bf16(result);
                    else
                        ((float *)out)[at + d] = result;
                }
            }
        }
        free(scores);
        free(buf);
    }
    return failed ? -1 : 0;
}

/* -- a decoder layer's bf16 elementwise steps and the greedy pick --------------------------------------
 * Written once (bf16_steps.h) over a few vector operations, and compiled twice: 16 lanes on AVX-512 BF16
 * (vcvtneps2bf16 rounds), 8 lanes on AVX2 (rounding to nearest even done on the bits). */

AVX512BF16 static inline __m512 widen16(const uint16_t *p) {
    return _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)p));
}

AVX512BF16 static inline __m512 rounded16(__m512 v) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); }

AVX512BF16 static inline void store16(uint16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}

/* e^x, 16 at a time, as exp8. */
AVX512BF16 static inline __m512 exp16(__m512 x) {
    const __m512 scaled = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
    const __m512 t = _mm512_min_ps(_mm512_max_ps(scaled, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(127.0f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < 7; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[i]));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    const __m512 result = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
    const __m512 finite = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_GT_OQ), result);
    return _mm512_mask_mov_ps(finite, _mm512_cmp_ps_mask(scaled, _mm512_set1_ps(128.0f), _CMP_GE_OQ),
                              _mm512_set1_ps(INFINITY));
}

AVX2 static inline __m256 widen8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* The bf16 bits of v rounded to nearest even (a NaN stays a quiet NaN), one per 32-bit lane. */
AVX2 static inline __m256i bf16_bits8(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

AVX2 static inline __m256 rounded8(__m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16)); }

AVX2 static inline void store8(uint16_t *p, __m256 v) {
    const __m256i bits = bf16_bits8(v);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
}

AVX2 static inline float reduce_add8(__m256 v) {
    float lanes[8], total = 0.0f;
    _mm256_storeu_ps(lanes, v);
    for (int j = 0; j < 8; j++) total += lanes[j];
    return total;
}

AVX2 static inline float reduce_max8(__m256 v) {
    float lanes[8], top = lanes[0] = -INFINITY;
    _mm256_storeu_ps(lanes, v);
    for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
    return top;
}

#define STEPS_TARGET AVX512BF16
#define STEP(name) name##_avx512
#define LANES 16
#define VEC __m512
#define V_LOAD widen16
#define V_ROUND rounded16
#define V_STORE store16
#define V_EXP exp16
#define V_SET1 _mm512_set1_ps
#define V_ADD _mm512_add_ps
#define V_MUL _mm512_mul_ps
#define V_DIV _mm512_div_ps
#define V_MAX _mm512_max_ps
#define V_FMA _mm512_fmadd_ps
#define V_REDUCE_ADD _mm512_reduce_add_ps
#define V_REDUCE_MAX _mm512_reduce_max_ps
#define V_NAN_MASK(v) ((unsigned)_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q))
#define V_EQ_MASK(a, b) ((unsigned)_mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ))
#include "bf16_steps.h"
#undef STEPS_TARGET
#undef STEP
#undef LANES
#undef VEC
#undef V_LOAD
#undef V_ROUND
#undef V_STORE
#undef V_EXP
#undef V_SET1
#undef V_ADD
#undef V_MUL
#undef V_DIV
#undef V_MAX
#undef V_FMA
#undef V_REDUCE_ADD
#undef V_REDUCE_MAX
#undef V_NAN_MASK
#undef V_EQ_MASK

#define STEPS_TARGET AVX2
#define STEP(name) name##_avx2
#define LANES 8
#define VEC __m256
#define V_LOAD widen8
#define V_ROUND rounded8
#define V_STORE store8
#define V_EXP exp8
#define V_SET1 _mm256_set1_ps
#define V_ADD _mm256_add_ps
#define V_MUL _mm256_mul_ps
#define V_DIV _mm256_div_ps
#define V_MAX _mm256_max_ps
#define V_FMA _mm256_fmadd_ps
#define V_REDUCE_ADD reduce_add8
#define V_REDUCE_MAX reduce_max8
#define V_NAN_MASK(v) ((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)))
#define V_EQ_MASK(a, b) ((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)))
#include "bf16_steps.h"

/* -- a step's new K/V into the pool, and the decodes' also into the decode scratch (bf16) ------------
 * Token t's K (and V) is kv_heads * head_dim contiguous elements at k + t * k_stride_t; it goes to the pool
 * region of slot_block[t], slot slot_offset[t] (pool: [blocks, 2, block_size, kv_heads, head_dim]), NaN and
 * +-inf stored as 0 (the pool's finite rule, engine/kv_cache.py). Tokens from decode_begin on are decodes:
 * decode i also goes to scratch row rows[i], position positions[i] (scratch_k/scratch_v: one layer's K or V
 * storage, strided by row, head, position), the same finite values. */
static inline void store_finite(uint16_t *to, const uint16_t *from, int64_t count) {
    for (int64_t i = 0; i < count; i++) to[i] = (from[i] & 0x7f80u) == 0x7f80u ? 0 : from[i];
}

int store_kv_bf16(const uint16_t *k, int64_t k_stride_t, const uint16_t *v, int64_t v_stride_t, int64_t tokens,
                  int64_t kv_heads, int64_t head_dim, uint16_t *pool, int64_t block_size, const int64_t *slot_block,
                  const int64_t *slot_offset, uint16_t *scratch_k, uint16_t *scratch_v, int64_t stride_row,
                  int64_t stride_head, int64_t stride_position, int64_t decode_begin, const int64_t *rows,
                  const int64_t *positions) {
    const int64_t width = kv_heads * head_dim;
    for (int64_t t = 0; t < tokens; t++) {
        uint16_t *region = pool + (slot_block[t] * 2 * block_size + slot_offset[t]) * width;
        uint16_t *pool_k = region, *pool_v = region + block_size * width;
        store_finite(pool_k, k + t * k_stride_t, width);
        store_finite(pool_v, v + t * v_stride_t, width);
        if (scratch_k == NULL || t < decode_begin) continue;
        const int64_t i = t - decode_begin, at = rows[i] * stride_row + positions[i] * stride_position;
        for (int64_t h = 0; h < kv_heads; h++) {
            memcpy(scratch_k + at + h * stride_head, pool_k + h * head_dim, sizeof(uint16_t) * head_dim);
            memcpy(scratch_v + at + h * stride_head, pool_v + h * head_dim, sizeof(uint16_t) * head_dim);
        }
    }
    return 0;
}
