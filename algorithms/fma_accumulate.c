/* fedsim's fused weighted sum (fedsim/algorithms/fused_sums.py): one read of every client's
 * float32 tensor, float64 accumulation in client order, one fused multiply-add per client and
 * element, as ATen's `acc.add_(x.to(float64), alpha=c)` does per client (the loader checks the
 * bits against ATen before it uses this). Built by the loader with the C compiler at hand. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#define TILE 32768 /* elements: a 256 KiB float64 tile stays in L2 while 50 clients stream */

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
        for (long k = 0; k < K; k++) {
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
