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

/* e^x for x <= 0: 2^(x log2 e) as 2^n (exponent bits) times a polynomial of 2^f, f in [-0.5, 0.5]. */
AVX2 static inline __m256 exp_nonpositive(__m256 x) {
    const __m256 t = _mm256_max_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _mm256_set1_ps(-126.0f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < 7; i++) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[i]));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    return _mm256_and_ps(result, _mm256_cmp_ps(t, _mm256_set1_ps(-126.0f), _CMP_GT_OQ)); /* underflow: 0 */
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
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + p), top8));
        _mm256_storeu_ps(s + p, e);
        total8 = _mm256_add_ps(total8, e);
    }
    float total = 0.0f;
    _mm256_storeu_ps(lanes, total8);
    for (int j = 0; j < 8; j++) total += lanes[j];
    if (p < length) {
        float tail[8] = {0};
        memcpy(tail, s + p, sizeof(float) * (length - p));
        _mm256_storeu_ps(lanes, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(tail), top8)));
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

/* -- a decoder layer's elementwise steps, bf16 on AVX-512 BF16 ----------------------------------------
 * torch runs each as three to seven kernels over a decode batch's few rows; here each is one pass, with
 * every bf16 rounding where torch rounds (vcvtneps2bf16: round to nearest even), so the results are
 * torch's (add_rms_norm's sum of squares is added in another order; silu's e^x is within 2e-7 of torch's).
 * Row lengths are multiples of 16 (the callers check). */

AVX512BF16 static inline __m512 widen16(const uint16_t *p) {
    return _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)p));
}

AVX512BF16 static inline __m256i narrow16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

AVX512BF16 static inline __m512 rounded16(__m512 v) { return _mm512_cvtpbh_ps((__m256bh)narrow16(v)); }

/* Per row: with a residual, residual = x + residual (rounded, stored), else the row is x;
 * out = weight * bf16(row * rsqrt(mean(row^2) + eps)) (Hugging Face's order). Rows contiguous. */
AVX512BF16 int add_rms_norm_bf16(const uint16_t *x, uint16_t *residual, const uint16_t *weight, int64_t rows,
                                 int64_t dim, float eps, uint16_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *source = x + r * dim;
        __m512 squares = _mm512_setzero_ps();
        if (residual != NULL) {
            uint16_t *stream = residual + r * dim;
            for (int64_t d = 0; d < dim; d += 16) {
                const __m256i sum = narrow16(_mm512_add_ps(widen16(source + d), widen16(stream + d)));
                _mm256_storeu_si256((__m256i *)(stream + d), sum);
                const __m512 value = _mm512_cvtpbh_ps((__m256bh)sum);
                squares = _mm512_fmadd_ps(value, value, squares);
            }
            source = stream;
        } else {
            for (int64_t d = 0; d < dim; d += 16) {
                const __m512 value = widen16(source + d);
                squares = _mm512_fmadd_ps(value, value, squares);
            }
        }
        const __m512 inverse = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)dim + eps));
        for (int64_t d = 0; d < dim; d += 16) {
            const __m512 normed = rounded16(_mm512_mul_ps(widen16(source + d), inverse));
            _mm256_storeu_si256((__m256i *)(out + r * dim + d), narrow16(_mm512_mul_ps(widen16(weight + d), normed)));
        }
    }
    return 0;
}

/* Rotate-half rotary embedding of x [T, heads, D] (token stride x_stride_t, heads contiguous within a
 * token) with cos/sin [T, D] (token stride table_stride_t) into out [T, heads, D] contiguous:
 * out = bf16(x * cos) + bf16(rotate_half(x) * sin), rotate_half(x) = (-x[D/2:], x[:D/2]). */
AVX512BF16 int rotary_bf16(const uint16_t *x, int64_t x_stride_t, const uint16_t *cos, const uint16_t *sin,
                           int64_t table_stride_t, int64_t tokens, int64_t heads, int64_t head_dim, uint16_t *out) {
    const int64_t half = head_dim / 2;
    const __m512 negate = _mm512_set1_ps(-1.0f);
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *in = x + t * x_stride_t + h * head_dim;
            uint16_t *to = out + (t * heads + h) * head_dim;
            for (int64_t d = 0; d < head_dim; d += 16) {
                const __m512 partner = d < half ? _mm512_mul_ps(negate, widen16(in + d + half)) : widen16(in + d - half);
                const __m512 a = rounded16(_mm512_mul_ps(widen16(in + d), widen16(cos + t * table_stride_t + d)));
                const __m512 b = rounded16(_mm512_mul_ps(partner, widen16(sin + t * table_stride_t + d)));
                _mm256_storeu_si256((__m256i *)(to + d), narrow16(_mm512_add_ps(a, b)));
            }
        }
    return 0;
}

/* e^x for any x, 16 at a time (as exp_nonpositive): 0 below e^-87 and +inf above e^88, as float's own. */
AVX512BF16 static inline __m512 exp16(__m512 x) {
    const __m512 scaled = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
    const __mmask16 overflows = _mm512_cmp_ps_mask(scaled, _mm512_set1_ps(128.0f), _CMP_GE_OQ);
    const __m512 t = _mm512_min_ps(_mm512_max_ps(scaled, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(127.0f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < 7; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[i]));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    const __m512 result = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
    const __m512 finite = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_GT_OQ), result);
    return _mm512_mask_mov_ps(finite, overflows, _mm512_set1_ps(INFINITY));
}

/* out [T, I] = bf16(silu(gate)) * up for gate_up [T, 2I] rows (gate | up), silu = g / (1 + e^-g). */
AVX512BF16 int silu_mul_bf16(const uint16_t *gate_up, int64_t tokens, int64_t inner, uint16_t *out) {
    const __m512 one = _mm512_set1_ps(1.0f), negate = _mm512_set1_ps(-1.0f);
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t *gate = gate_up + t * 2 * inner, *up = gate + inner;
        for (int64_t i = 0; i < inner; i += 16) {
            const __m512 g = widen16(gate + i);
            const __m512 silu = rounded16(_mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_mul_ps(negate, g)))));
            _mm256_storeu_si256((__m256i *)(out + t * inner + i), narrow16(_mm512_mul_ps(silu, widen16(up + i))));
        }
    }
    return 0;
}

/* -- greedy sampling: the first maximum of each row of bf16 logits, as torch.max(dim=-1) picks it (a NaN
 * is the maximum: the row's first NaN). Rows [rows, cols] with row stride; one pass to find the maximum,
 * one to find where it first is (both over a row in L2). */
AVX512BF16 static int64_t argmax_row_bf16(const uint16_t *row, int64_t cols) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) {
        const __m512 value = widen16(row + c);
        nan |= _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
        top = _mm512_max_ps(top, value);
    }
    float best = _mm512_reduce_max_ps(top);
    for (int64_t tail = c; tail < cols; tail++) {
        const float value = bf16_to_float(row[tail]);
        nan |= value != value;
        best = value > best ? value : best;
    }
    for (int64_t i = 0; i < cols; i++) { /* a NaN, or the first maximum: found early in the vector pass below */
        if (i + 16 <= cols) {
            const __m512 value = widen16(row + i);
            const __mmask16 hit = nan ? _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q)
                                      : _mm512_cmp_ps_mask(value, _mm512_set1_ps(best), _CMP_EQ_OQ);
            if (hit) return i + __builtin_ctz(hit);
            i += 15;
            continue;
        }
        const float value = bf16_to_float(row[i]);
        if (nan ? value != value : value == best) return i;
    }
    return 0;
}

int argmax_bf16(const uint16_t *logits, int64_t rows, int64_t cols, int64_t row_stride, int64_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row_bf16(logits + r * row_stride, cols);
    return 0;
}

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
