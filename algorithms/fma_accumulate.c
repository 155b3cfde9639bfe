/* fedsim's fused weighted sum (fedsim/algorithms/fused_sums.py): one read of every client's
 * float32 tensor, float64 accumulation in client order, one fused multiply-add per client and
 * element, as ATen's `acc.add_(x.to(float64), alpha=c)` does per client (the loader checks the
 * bits against ATen before it uses this). Built by the loader with the C compiler at hand. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#define TILE 32768 /* elements: a 256 KiB float64 tile stays in L2 while the clients stream */

/* For i in [lo, hi): a_i = fma(c_k, (double) x_k[i], a_i) for k = 0 .. K-1 in order, from
 * acc[i] (acc != NULL, written back) or from +0.0 (acc == NULL: a tile-sized accumulator on
 * the heap — thread stacks can be as small as 128 KiB); out (when not NULL) receives
 * (float) a_i. Returns 0, or 1 when the tile could not be allocated (nothing written). */
int fedsim_fma_accumulate(double *acc, const float *const *xs, const double *cs, long K,
                          long lo, long hi, float *out) {
    double *tile = NULL;
    if (!acc) {
        tile = malloc(TILE * sizeof(double));
        if (!tile)
            return 1;
    }
    for (long s = lo; s < hi; s += TILE) {
        long m = (s + TILE < hi ? s + TILE : hi) - s;
        double *a = acc ? acc + s : tile;
        if (!acc)
            for (long i = 0; i < m; i++) a[i] = 0.0;
        long k = 0;
        /* Four clients per sweep of the tile: the same fma chain per element, in client
         * order, with a quarter of the tile's loads and stores. */
        for (; k + 4 <= K; k += 4) {
            const float *x0 = xs[k] + s, *x1 = xs[k + 1] + s, *x2 = xs[k + 2] + s,
                        *x3 = xs[k + 3] + s;
            const double c0 = cs[k], c1 = cs[k + 1], c2 = cs[k + 2], c3 = cs[k + 3];
            for (long i = 0; i < m; i++)
                a[i] = fma(c3, (double) x3[i],
                           fma(c2, (double) x2[i],
                               fma(c1, (double) x1[i], fma(c0, (double) x0[i], a[i]))));
        }
        for (; k < K; k++) {
            const float *x = xs[k] + s;
            const double c = cs[k];
            for (long i = 0; i < m; i++) a[i] = fma(c, (double) x[i], a[i]);
        }
        if (out)
            for (long i = 0; i < m; i++) out[s + i] = (float) a[i];
    }
    free(tile);
    return 0;
}

/* 1 when built with OpenMP: fedsim_fma_accumulate_threads then runs its shares on the OpenMP
 * runtime already in the process (torch's: no second pool spinning against it). */
int fedsim_fma_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* [0, n) in `parts` ranges of whole tiles, one OpenMP thread each (in the caller's thread
 * without OpenMP): the same arithmetic per element whatever the split. Returns 0 or 1. */
int fedsim_fma_accumulate_threads(double *acc, const float *const *xs, const double *cs,
                                  long K, long n, float *out, int parts) {
    long tiles = (n + TILE - 1) / TILE;
    if (parts < 1)
        parts = 1;
    if (parts > tiles)
        parts = tiles > 0 ? (int) tiles : 1;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static) reduction(| : failed)
#endif
    for (int i = 0; i < parts; i++) {
        long lo = tiles * i / parts * TILE, hi = tiles * (i + 1) / parts * TILE;
        failed |= fedsim_fma_accumulate(acc, xs, cs, K, lo < n ? lo : n, hi < n ? hi : n, out);
    }
    return failed;
}
