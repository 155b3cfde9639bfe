/* fedsim's subsampled randomized Hadamard transform of matrix rows (fedsim/algorithms/srht.py):
 * for each row x of a row-major float32 matrix, t = (x * signs) zero-padded to npad = 2^q
 * entries, the unnormalised Walsh–Hadamard transform of t by butterflies (a, b) -> (a + b,
 * a - b) over the strides h = 1, 2, 4, ..., npad / 2 in that order, and the output row
 * y[c] = t[idx[c]] * osign[c] for c < ell. Every butterfly rounds once, so any schedule that
 * keeps the stage order gives the same bits as the reference loop below (and as the torch
 * code in srht.py, which the loader checks before it uses this file). Built by the loader
 * with the C compiler at hand (no -ffast-math, no contraction: a + b stays a + b). */
#include <stddef.h>
#include <stdlib.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* The stages whose butterflies lie inside one SIMD vector (h < W lanes) of every vector of
 * t; returns the first stride still to do. Lane i holds a when bit h of i is clear and b when
 * it is set; with p the vector whose lanes are swapped across bit h (p[i] = t[i ^ h]), the
 * new lane is fma(+1, a, b) = a + b or fma(-1, b, a) = a - b: one rounding, the same bits as
 * the plain butterfly. */
static long inlane_stages(float *t, long npad) {
#if defined(__AVX512F__)
    if (npad >= 16) {
        __m512i perm[4];
        __m512 sign[4];
        for (int s = 0; s < 4; s++) {
            int idx[16];
            float sg[16];
            for (int i = 0; i < 16; i++) {
                idx[i] = i ^ (1 << s);
                sg[i] = (i >> s) & 1 ? -1.0f : 1.0f;
            }
            perm[s] = _mm512_loadu_si512(idx);
            sign[s] = _mm512_loadu_ps(sg);
        }
        for (long v = 0; v < npad; v += 16) {
            __m512 x = _mm512_loadu_ps(t + v);
            for (int s = 0; s < 4; s++)
                x = _mm512_fmadd_ps(sign[s], x, _mm512_permutexvar_ps(perm[s], x));
            _mm512_storeu_ps(t + v, x);
        }
        return 16;
    }
#elif defined(__AVX2__)
    if (npad >= 8) {
        __m256i perm[3];
        __m256 sign[3];
        for (int s = 0; s < 3; s++) {
            int idx[8];
            float sg[8];
            for (int i = 0; i < 8; i++) {
                idx[i] = i ^ (1 << s);
                sg[i] = (i >> s) & 1 ? -1.0f : 1.0f;
            }
            perm[s] = _mm256_loadu_si256((const __m256i *) idx);
            sign[s] = _mm256_loadu_ps(sg);
        }
        for (long v = 0; v < npad; v += 8) {
            __m256 x = _mm256_loadu_ps(t + v);
            for (int s = 0; s < 3; s++)
                x = _mm256_fmadd_ps(sign[s], x, _mm256_permutevar8x32_ps(x, perm[s]));
            _mm256_storeu_ps(t + v, x);
        }
        return 8;
    }
#endif
    (void) t;
    (void) npad;
    return 1;
}

/* The remaining stages h, 2h, ... < npad, from ``h``: two at a time where both span whole
 * vectors (AVX-512: the pair of stages h and 2h on x0..x3 at j, j + h, j + 2h, j + 3h is
 * (x0 + x1, x0 - x1, x2 + x3, x2 - x3), then the same across the pairs: the butterflies and
 * their order of the two radix-2 stages, with half the loads and stores), else one at a time. */
static void cross_stages(float *t, long npad, long h) {
#if defined(__AVX512F__)
    for (; h >= 16 && 4 * h <= npad; h *= 4)
        for (long i = 0; i < npad; i += 4 * h)
            for (long j = i; j < i + h; j += 16) {
                __m512 x0 = _mm512_loadu_ps(t + j), x1 = _mm512_loadu_ps(t + j + h);
                __m512 x2 = _mm512_loadu_ps(t + j + 2 * h), x3 = _mm512_loadu_ps(t + j + 3 * h);
                __m512 a0 = _mm512_add_ps(x0, x1), a1 = _mm512_sub_ps(x0, x1);
                __m512 a2 = _mm512_add_ps(x2, x3), a3 = _mm512_sub_ps(x2, x3);
                _mm512_storeu_ps(t + j, _mm512_add_ps(a0, a2));
                _mm512_storeu_ps(t + j + h, _mm512_add_ps(a1, a3));
                _mm512_storeu_ps(t + j + 2 * h, _mm512_sub_ps(a0, a2));
                _mm512_storeu_ps(t + j + 3 * h, _mm512_sub_ps(a1, a3));
            }
#endif
    for (; h < npad; h <<= 1)
        for (long i = 0; i < npad; i += 2 * h)
            for (long j = i; j < i + h; j++) {
                float a = t[j], b = t[j + h];
                t[j] = a + b;
                t[j + h] = a - b;
            }
}

/* s[0] after s[j] += s[j + len] for len = n / 2, ..., 1 (n a power of two). */
static double halve(double *s, long n) {
    long len = n / 2;
#if defined(__AVX512F__)
    for (; len >= 8; len /= 2)
        for (long j = 0; j < len; j += 8)
            _mm512_storeu_pd(s + j, _mm512_add_pd(_mm512_loadu_pd(s + j),
                                                  _mm512_loadu_pd(s + j + len)));
#endif
    for (; len >= 1; len /= 2)
        for (long j = 0; j < len; j++) s[j] += s[j + len];
    return s[0];
}

/* One thread's share: rows [lo, hi) of x (n columns) into y (ell columns), and when sq is not NULL each row's
 * sum of squares in float64 into sq[r]: the squares (exact in float64) padded with zeros to
 * npad, then halved in order, s[j] += s[j + len] for len = npad / 2, ..., 1 (srht.py does the
 * same). Returns 0, or 1 when the row buffers could not be allocated (nothing written). */
static int srht_range(const float *x, long lo, long hi, long n, long npad, const float *signs,
                      const long *idx, const float *osign, long ell, float *y, double *sq) {
    float *t = malloc((size_t) npad * sizeof(float));
    long half = npad / 2;
    double *s = sq ? malloc((size_t) (half ? half : 1) * sizeof(double)) : NULL;
    if (!t || (sq && !s)) {
        free(t);
        free(s);
        return 1;
    }
    for (long r = lo; r < hi; r++) {
        const float *row = x + r * n;
        if (sq && npad == 1) {
            sq[r] = (double) row[0] * (double) row[0];
        } else if (sq) {
            /* The first halving fused with the squaring: s[j] = x[j]^2 + x[j + half]^2. */
            long full = n - half < 0 ? 0 : n - half; /* j < full: both halves are data */
            long j0 = 0;
#if defined(__AVX512F__)
            for (; j0 + 8 <= full; j0 += 8) {
                __m512d a = _mm512_cvtps_pd(_mm256_loadu_ps(row + j0));
                __m512d b = _mm512_cvtps_pd(_mm256_loadu_ps(row + j0 + half));
                _mm512_storeu_pd(s + j0, _mm512_add_pd(_mm512_mul_pd(a, a), _mm512_mul_pd(b, b)));
            }
#endif
            for (long j = j0; j < full; j++) {
                double a = row[j], b = row[j + half];
                s[j] = a * a + b * b;
            }
            for (long j = full; j < half; j++) {
                double a = j < n ? row[j] : 0.0;
                s[j] = a * a + 0.0;
            }
            sq[r] = halve(s, half);
        }
        for (long j = 0; j < n; j++) t[j] = row[j] * signs[j];
        for (long j = n; j < npad; j++) t[j] = 0.0f;
        cross_stages(t, npad, inlane_stages(t, npad));
        float *out = y + r * ell;
        for (long c = 0; c < ell; c++) out[c] = t[idx[c]] * osign[c];
    }
    free(t);
    free(s);
    return 0;
}

/* 1 when built with OpenMP: fedsim_srht_rows then splits its rows over `threads` threads of
 * the OpenMP runtime already in the process (torch's: no second pool spinning against it). */
int fedsim_srht_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Rows [lo, hi), over `threads` OpenMP threads when built with OpenMP (else in the caller's
 * thread). Returns 0, or 1 when a row buffer could not be allocated. */
int fedsim_srht_rows(const float *x, long lo, long hi, long n, long npad, const float *signs,
                     const long *idx, const float *osign, long ell, float *y, double *sq,
                     int threads) {
    int failed = 0;
#ifdef _OPENMP
    long parts = threads < 1 ? 1 : threads;
    if (parts > hi - lo)
        parts = hi - lo > 0 ? hi - lo : 1;
#pragma omp parallel for num_threads(parts) schedule(static) reduction(| : failed)
    for (long i = 0; i < parts; i++)
        failed |= srht_range(x, lo + (hi - lo) * i / parts, lo + (hi - lo) * (i + 1) / parts, n,
                             npad, signs, idx, osign, ell, y, sq);
#else
    (void) threads;
    failed = srht_range(x, lo, hi, n, npad, signs, idx, osign, ell, y, sq);
#endif
    return failed;
}
