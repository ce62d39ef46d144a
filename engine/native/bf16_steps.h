/* A decoder layer's bf16 elementwise steps and the greedy pick, written once over LANES-wide vector
 * operations (VEC, V_*) and included by cpu_kernels.c once per instruction set, STEP(name) naming each
 * function for it. torch runs each step as three to seven kernels over a decode batch's few rows; here
 * each is one pass, every bf16 rounding where torch rounds (to nearest even), so the results are torch's
 * (add_rms_norm's sum of squares is added in another order; silu's e^x is within 2e-7 of torch's).
 * Row lengths are multiples of 16 (the callers check), except argmax's. */

/* Per row: with a residual, residual = x + residual (rounded, stored), else the row is x;
 * out = weight * bf16(row * rsqrt(mean(row^2) + eps)) (Hugging Face's order). Rows contiguous. */
STEPS_TARGET int STEP(add_rms_norm)(const uint16_t *x, uint16_t *residual, const uint16_t *weight, int64_t rows,
                                   int64_t dim, float eps, uint16_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *source = x + r * dim;
        VEC squares = V_SET1(0.0f);
        if (residual != NULL) {
            uint16_t *stream = residual + r * dim;
            for (int64_t d = 0; d < dim; d += LANES) {
                const VEC value = V_ROUND(V_ADD(V_LOAD(source + d), V_LOAD(stream + d)));
                V_STORE(stream + d, value);
                squares = V_FMA(value, value, squares);
            }
            source = stream;
        } else {
            for (int64_t d = 0; d < dim; d += LANES) {
                const VEC value = V_LOAD(source + d);
                squares = V_FMA(value, value, squares);
            }
        }
        const VEC inverse = V_SET1(1.0f / sqrtf(V_REDUCE_ADD(squares) / (float)dim + eps));
        for (int64_t d = 0; d < dim; d += LANES)
            V_STORE(out + r * dim + d, V_MUL(V_LOAD(weight + d), V_ROUND(V_MUL(V_LOAD(source + d), inverse))));
    }
    return 0;
}

/* Rotate-half rotary embedding of x [T, heads, D] (token stride x_stride_t, heads contiguous within a
 * token) with cos/sin [T, D] (token stride table_stride_t) into out [T, heads, D] contiguous:
 * out = bf16(x * cos) + bf16(rotate_half(x) * sin), rotate_half(x) = (-x[D/2:], x[:D/2]). */
STEPS_TARGET int STEP(rotary)(const uint16_t *x, int64_t x_stride_t, const uint16_t *cos, const uint16_t *sin,
                             int64_t table_stride_t, int64_t tokens, int64_t heads, int64_t head_dim, uint16_t *out) {
    const int64_t half = head_dim / 2;
    const VEC negate = V_SET1(-1.0f);
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *in = x + t * x_stride_t + h * head_dim;
            const uint16_t *c = cos + t * table_stride_t, *s = sin + t * table_stride_t;
            uint16_t *to = out + (t * heads + h) * head_dim;
            for (int64_t d = 0; d < head_dim; d += LANES) {
                const VEC partner = d < half ? V_MUL(negate, V_LOAD(in + d + half)) : V_LOAD(in + d - half);
                const VEC a = V_ROUND(V_MUL(V_LOAD(in + d), V_LOAD(c + d)));
                V_STORE(to + d, V_ADD(a, V_ROUND(V_MUL(partner, V_LOAD(s + d)))));
            }
        }
    return 0;
}

/* out [T, I] = bf16(silu(gate)) * up for gate_up [T, 2I] rows (gate | up), silu = g / (1 + e^-g). */
STEPS_TARGET int STEP(silu_mul)(const uint16_t *gate_up, int64_t tokens, int64_t inner, uint16_t *out) {
    const VEC one = V_SET1(1.0f), negate = V_SET1(-1.0f);
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t *gate = gate_up + t * 2 * inner, *up = gate + inner;
        for (int64_t i = 0; i < inner; i += LANES) {
            const VEC g = V_LOAD(gate + i);
            const VEC silu = V_ROUND(V_DIV(g, V_ADD(one, V_EXP(V_MUL(negate, g)))));
            V_STORE(out + t * inner + i, V_MUL(silu, V_LOAD(up + i)));
        }
    }
    return 0;
}

/* The first maximum of a row of bf16 logits, as torch.max(dim=-1) picks it (a NaN is the maximum: the
 * row's first NaN): one pass for the maximum, one for where it first is (a row sits in L2). */
STEPS_TARGET static int64_t STEP(argmax_row)(const uint16_t *row, int64_t cols) {
    VEC top = V_SET1(-INFINITY);
    unsigned nan = 0;
    int64_t c = 0;
    for (; c + LANES <= cols; c += LANES) {
        const VEC value = V_LOAD(row + c);
        nan |= V_NAN_MASK(value);
        top = V_MAX(top, value);
    }
    float best = V_REDUCE_MAX(top);
    for (int64_t tail = c; tail < cols; tail++) {
        const float value = bf16_to_float(row[tail]);
        nan |= value != value;
        best = value > best ? value : best;
    }
    for (int64_t i = 0; i < cols; i++) {
        if (i + LANES <= cols) {
            const VEC value = V_LOAD(row + i);
            const unsigned hit = nan ? V_NAN_MASK(value) : V_EQ_MASK(value, V_SET1(best));
            if (hit) return i + __builtin_ctz(hit);
            i += LANES - 1;
            continue;
        }
        const float value = bf16_to_float(row[i]);
        if (nan ? value != value : value == best) return i;
    }
    return 0;
}

int STEP(argmax)(const uint16_t *logits, int64_t rows, int64_t cols, int64_t row_stride, int64_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) out[r] = STEP(argmax_row)(logits + r * row_stride, cols);
    return 0;
}
