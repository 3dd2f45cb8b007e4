/* gpt3zh CPU kernels: y (rows, m) = x (rows, n) @ w (m, n)^T [+ bias (m)] for 1-4 rows, in float32
 * and in bfloat16 (bf16 weights, inputs and outputs; products summed in float32, the result
 * rounded to nearest even once, as oneDNN's bf16 inner product does).
 *
 * A decode step multiplies one row per sequence by every weight once, so it is bound by how fast
 * the weights stream from memory. This kernel streams each thread's contiguous block of weight
 * rows once, front to back, with two vector accumulators per input row: on the base preset's
 * 768-wide matrices that runs at ~95% of a plain reduction's bandwidth, where MKL's GEMV, oneDNN's
 * inner product and batched GEMM reach 55-60% (docs/benchmarks.md). Compiled on first use by
 * gpt3zh/ckernel.py with the machine's C compiler (-O3 -march=native -fopenmp) and linked against
 * the OpenMP runtime torch already has loaded, so both share one thread pool.
 *
 * Vectors are GCC/Clang vector extensions: the compiler lowers them to AVX-512, AVX2 or NEON.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define VL 16
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef uint16_t vh __attribute__((vector_size(VL * sizeof(uint16_t))));
typedef uint32_t vu __attribute__((vector_size(VL * sizeof(uint32_t))));

static inline vf load(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }

/* VL bfloat16 values widened to float32: the bf16 bits are the float's upper half. */
static inline vf load_bf16(const uint16_t* p) {
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch's float -> bfloat16 conversion; NaN stays a (quiet) NaN. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float hsum(vf v) {
    float s = 0.f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}

/* Output features [r0, r1) for `rows` input rows (a compile-time constant after inlining). */
static inline __attribute__((always_inline)) void block(const float* w, const float* x, int64_t ldx,
        const float* b, float* y, int64_t m, int64_t n, int64_t r0, int64_t r1, const int rows) {
    const int64_t nv = n / (2 * VL) * (2 * VL);
    for (int64_t r = r0; r < r1; r++) {
        const float* wr = w + r * n;
        vf a[4], c[4];
        for (int k = 0; k < rows; k++) { a[k] = (vf){0}; c[k] = (vf){0}; }
        for (int64_t i = 0; i < nv; i += 2 * VL) {
            const vf w0 = load(wr + i), w1 = load(wr + i + VL);
            for (int k = 0; k < rows; k++) {
                a[k] += w0 * load(x + k * ldx + i);
                c[k] += w1 * load(x + k * ldx + i + VL);
            }
        }
        for (int k = 0; k < rows; k++) {
            float s = hsum(a[k] + c[k]);
            for (int64_t i = nv; i < n; i++) s += wr[i] * x[k * ldx + i];
            y[k * m + r] = b ? s + b[r] : s;
        }
    }
}

static void run(const float* w, const float* x, int64_t ldx, const float* b, float* y, int64_t m,
                int64_t n, int64_t rows, int64_t r0, int64_t r1) {
    switch (rows) {
        case 1: block(w, x, ldx, b, y, m, n, r0, r1, 1); break;
        case 2: block(w, x, ldx, b, y, m, n, r0, r1, 2); break;
        case 3: block(w, x, ldx, b, y, m, n, r0, r1, 3); break;
        case 4: block(w, x, ldx, b, y, m, n, r0, r1, 4); break;
    }
}

/* bfloat16 weights: each thread's rows of w widened in registers; x already float32 (xf). */
static inline __attribute__((always_inline)) void block_bf16(const uint16_t* w, const float* xf, int64_t n,
        const uint16_t* b, uint16_t* y, int64_t m, int64_t r0, int64_t r1, const int rows) {
    const int64_t nv = n / (2 * VL) * (2 * VL);
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t* wr = w + r * n;
        vf a[4], c[4];
        for (int k = 0; k < rows; k++) { a[k] = (vf){0}; c[k] = (vf){0}; }
        for (int64_t i = 0; i < nv; i += 2 * VL) {
            const vf w0 = load_bf16(wr + i), w1 = load_bf16(wr + i + VL);
            for (int k = 0; k < rows; k++) {
                a[k] += w0 * load(xf + k * n + i);
                c[k] += w1 * load(xf + k * n + i + VL);
            }
        }
        for (int k = 0; k < rows; k++) {
            float s = hsum(a[k] + c[k]);
            for (int64_t i = nv; i < n; i++) s += bf16_to_f32(wr[i]) * xf[k * n + i];
            y[k * m + r] = f32_to_bf16(b ? s + bf16_to_f32(b[r]) : s);
        }
    }
}

static void run_bf16(const uint16_t* w, const float* xf, int64_t n, const uint16_t* b, uint16_t* y,
                     int64_t m, int64_t rows, int64_t r0, int64_t r1) {
    switch (rows) {
        case 1: block_bf16(w, xf, n, b, y, m, r0, r1, 1); break;
        case 2: block_bf16(w, xf, n, b, y, m, r0, r1, 2); break;
        case 3: block_bf16(w, xf, n, b, y, m, r0, r1, 3); break;
        case 4: block_bf16(w, xf, n, b, y, m, r0, r1, 4); break;
    }
}

int gpt3zh_kernel_abi(void) { return 4; }

/* Returns 0, or -1 for a row count outside 1..4 (nothing written). */
/* ---- GELU, applied to each thread's outputs while they are in its cache ----------------------
 * erf as torch's vectorized CPU erf computes it (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7),
 * with a vectorized exp (Cody-Waite reduction, degree-6 polynomial, ~2 ulp); tanh as
 * 1 - 2 / (exp(2u) + 1). act: 0 none, 1 GELU (erf), 2 GELU (tanh approximation). */
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));

static inline vf vsel(vi mask, vf a, vf b) {  /* mask lanes -1: a, 0: b */
    vi ai, bi, r;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    r = (ai & mask) | (bi & ~mask);
    vf out;
    memcpy(&out, &r, sizeof out);
    return out;
}

static inline vf vexp(vf x) {
    const vf hi = (vf){0} + 88.3762626647949f, lo = (vf){0} - 87.3365447504019f;
    x = vsel(x > hi, hi, x);
    x = vsel(x < lo, lo, x);
    const vf shift = (vf){0} + 12582912.f;  /* 1.5 * 2^23: adding it rounds to an integer */
    vf n = (x * 1.44269504088896341f + shift) - shift;
    vf r = x - n * 0.693359375f - n * -2.12194440e-4f;
    vf p = (vf){0} + 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

static inline vf verf(vf z) {
    vi zi, sign;
    memcpy(&zi, &z, sizeof zi);
    sign = zi & (int32_t)0x80000000;
    vi ai = zi & 0x7fffffff;
    vf a;
    memcpy(&a, &ai, sizeof a);
    const vf t = 1.f / (a * 0.3275911f + 1.f);
    vf r = t * 1.061405429f - 1.453152027f;
    r = r * t + 1.421413741f;
    r = r * t - 0.284496736f;
    r = r * t + 0.254829592f;
    vf e = 1.f - r * t * vexp(-(a * a));
    vi ei;
    memcpy(&ei, &e, sizeof ei);
    ei |= sign;
    memcpy(&e, &ei, sizeof e);
    return e;
}

static inline vf vgelu(vf x, int act) {
    if (act == 1) return 0.5f * x * (1.f + verf(x * 0.70710678118654752f));
    const vf u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (2.f - 2.f / (vexp(2.f * u) + 1.f));
}

static void activate(float* y, int64_t len, int act) {
    int64_t i = 0;
    for (; i + VL <= len; i += VL) {
        vf v = vgelu(load(y + i), act);
        memcpy(y + i, &v, sizeof v);
    }
    if (i < len) {  /* the tail through a padded vector */
        float tmp[VL] = {0};
        memcpy(tmp, y + i, (size_t)(len - i) * sizeof(float));
        vf v = vgelu(load(tmp), act);
        memcpy(y + i, &v, (size_t)(len - i) * sizeof(float));
    }
}

static void run_act(const float* w, const float* x, int64_t ldx, const float* b, float* y, int64_t m,
                    int64_t n, int64_t rows, int64_t r0, int64_t r1, int act) {
    run(w, x, ldx, b, y, m, n, rows, r0, r1);
    if (act)
        for (int64_t k = 0; k < rows; k++) activate(y + k * m + r0, r1 - r0, act);
}

/* y = act(x @ w^T + b). Returns 0, -1 for a row count outside 1..4 or an unknown act (nothing written). */
int gpt3zh_linear_f32(const float* w, const float* x, int64_t ldx, const float* b, float* y,
                      int64_t m, int64_t n, int64_t rows, int threads, int act) {
    if (rows < 1 || rows > 4 || act < 0 || act > 2) return -1;
    if (threads <= 1 || m < 64) {
        run_act(w, x, ldx, b, y, m, n, rows, 0, m, act);
        return 0;
    }
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        run_act(w, x, ldx, b, y, m, n, rows, m * t / nt, m * (t + 1) / nt, act);
    }
    return 0;
}

/* bfloat16: the inputs are widened to float32 once (a buffer of rows x n floats), then as above.
 * Returns 0, -1 for a row count outside 1..4, -2 when that buffer cannot be had (nothing written). */
int gpt3zh_linear_bf16(const uint16_t* w, const uint16_t* x, int64_t ldx, const uint16_t* b, uint16_t* y,
                       int64_t m, int64_t n, int64_t rows, int threads) {
    if (rows < 1 || rows > 4) return -1;
    float* xf = malloc((size_t)(rows * n) * sizeof(float) + 64);
    if (!xf) return -2;
    for (int64_t k = 0; k < rows; k++)
        for (int64_t i = 0; i < n; i++) xf[k * n + i] = bf16_to_f32(x[k * ldx + i]);
    if (threads <= 1 || m < 64) {
        run_bf16(w, xf, n, b, y, m, rows, 0, m);
    } else {
        #pragma omp parallel num_threads(threads)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            run_bf16(w, xf, n, b, y, m, rows, m * t / nt, m * (t + 1) / nt);
        }
    }
    free(xf);
    return 0;
}

/* One decode step's attention, float32, for `rows` rows that each add one token at slot pos[r]
 * (pos + r * pos_stride; stride 0: one slot for all rows) and attend to slots [0, pos[r]]: the new
 * token's key and value are written into the caches, then y = softmax(q K^T * scale) V per head.
 * qkv (rows, N * 3 * D) is laid out [N][3][D] (the model's qkv layer); k_cache, v_cache are
 * contiguous (>= rows, N, S, D); y (rows, N * D) is laid out [N][D]. Returns 0, or -1 for a slot
 * outside 0..S-1 (nothing written). */
int gpt3zh_decode_attention_f32(const float* qkv, float* kc, float* vc, float* y, int64_t rows, int64_t n_head,
                                int64_t slots, int64_t head_dim, const int64_t* pos, int64_t pos_stride,
                                float scale, int threads) {
    const int64_t N = n_head, S = slots, D = head_dim;
    for (int64_t r = 0; r < rows; r++)
        if (pos[r * pos_stride] < 0 || pos[r * pos_stride] >= S) return -1;
    #pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if (threads > 1)
    for (int64_t t = 0; t < rows * N; t++) {
        const int64_t r = t / N, h = t % N, p = pos[r * pos_stride], len = p + 1;
        const float* q = qkv + (r * N + h) * 3 * D;
        float* K = kc + (r * N + h) * S * D;
        float* V = vc + (r * N + h) * S * D;
        memcpy(K + p * D, q + D, (size_t)D * sizeof(float));
        memcpy(V + p * D, q + 2 * D, (size_t)D * sizeof(float));
        float stack[1024];
        float* w = len <= 1024 ? stack : malloc((size_t)len * sizeof(float));
        float* out = y + (r * N + h) * D;
        if (!w) {  /* no memory for the scores: NaN marks the row (cannot happen below 1024 slots) */
            for (int64_t d = 0; d < D; d++) out[d] = __builtin_nanf("");
            continue;
        }
        float top = -__builtin_inff();
        for (int64_t j = 0; j < len; j++) {
            const float* kj = K + j * D;
            float s = 0.f;
            #pragma omp simd reduction(+:s)
            for (int64_t d = 0; d < D; d++) s += q[d] * kj[d];
            w[j] = s * scale;
            top = w[j] > top ? w[j] : top;
        }
        float sum = 0.f;
        for (int64_t j = 0; j < len; j++) { w[j] = __builtin_expf(w[j] - top); sum += w[j]; }
        const float inv = 1.f / sum;
        for (int64_t d = 0; d < D; d++) out[d] = 0.f;
        for (int64_t j = 0; j < len; j++) {
            const float a = w[j] * inv;
            const float* vj = V + j * D;
            #pragma omp simd
            for (int64_t d = 0; d < D; d++) out[d] += a * vj[d];
        }
        if (w != stack) free(w);
    }
    return 0;
}
