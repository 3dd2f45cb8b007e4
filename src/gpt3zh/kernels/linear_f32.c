/* gpt3zh CPU kernel: y (rows, m) = x (rows, n) @ w (m, n)^T [+ bias (m)] in float32, for 1-4 rows.
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
#include <string.h>
#include <omp.h>

#define VL 16
typedef float vf __attribute__((vector_size(VL * sizeof(float))));

static inline vf load(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }

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

int gpt3zh_kernel_abi(void) { return 1; }

/* Returns 0, or -1 for a row count outside 1..4 (nothing written). */
int gpt3zh_linear_f32(const float* w, const float* x, int64_t ldx, const float* b, float* y,
                      int64_t m, int64_t n, int64_t rows, int threads) {
    if (rows < 1 || rows > 4) return -1;
    if (threads <= 1 || m < 64) {
        run(w, x, ldx, b, y, m, n, rows, 0, m);
        return 0;
    }
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        run(w, x, ldx, b, y, m, n, rows, m * t / nt, m * (t + 1) / nt);
    }
    return 0;
}
