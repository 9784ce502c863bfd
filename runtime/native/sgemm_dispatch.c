/* cblas_sgemm for MLX's Linux CPU backend, dispatched by shape between two BLAS libraries.
 *
 * A batched decode step multiplies a few rows (one per sequence) by every weight matrix. OpenBLAS
 * packs the weights for such a product, so at 2 to 12 rows it reads them about twice over: on a
 * 2-core CI machine SmolLM2-135M's matmuls took 66 ms at 1 row and 118-130 ms at 4 rows with two
 * OpenBLAS threads. BLIS multiplies skinny matrices without packing ("sup" kernels) and took 44 and
 * 66 ms on one thread, but runs a long prompt's matmuls at a sixth of OpenBLAS's speed. So this
 * library exports cblas_sgemm, the one BLAS entry point of MLX's float32 matmul, and sends products
 * of at most `skinny_rows` output rows to BLIS's typed API (bli_sgemm, whose names cannot clash with
 * OpenBLAS's) and all others to OpenBLAS's cblas_sgemm. runtime/blas.py loads it ahead of OpenBLAS
 * and calls mlxrunner_sgemm_init before MLX is imported; it is built by scripts/build-sgemm.sh.
 * Another process (bench/http_vs_mlxlm.py's mlx_lm.server) gets the same dispatch with
 * LD_PRELOAD=this library:OpenBLAS and the three MLXRUNNER_SGEMM_* variables read below.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

enum { ROW_MAJOR = 101, COL_MAJOR = 102, NO_TRANS = 111 };

typedef void (*cblas_sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                               const float *, int, float, float *, int);
/* bli_sgemm(transa, transb, m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) with
 * BLIS's 64-bit dim_t/inc_t and trans_t an int enum (0: no transpose). */
typedef void (*bli_sgemm_fn)(int, int, int64_t, int64_t, int64_t, const float *, const float *,
                             int64_t, int64_t, const float *, int64_t, int64_t, const float *,
                             float *, int64_t, int64_t);

static cblas_sgemm_fn general;
static bli_sgemm_fn skinny;
static int skinny_rows;

/* Returns 0 when both libraries were found, else a negative code (and leaves nothing set). */
int mlxrunner_sgemm_init(const char *openblas, const char *blis, int rows) {
    void *a = dlopen(openblas, RTLD_NOW | RTLD_LOCAL);
    void *b = dlopen(blis, RTLD_NOW | RTLD_LOCAL);
    if (a == NULL || b == NULL) return -1;
    cblas_sgemm_fn g = (cblas_sgemm_fn)dlsym(a, "cblas_sgemm");
    bli_sgemm_fn s = (bli_sgemm_fn)dlsym(b, "bli_sgemm");
    void (*threads)(int64_t) = (void (*)(int64_t))dlsym(b, "bli_thread_set_num_threads");
    if (g == NULL || s == NULL || threads == NULL) return -2;
    /* One thread: a skinny product is bound by reading the weights, which one core's BLIS does
     * faster than two (measured: 44 ms against 47 at 1 row, 66 against 76 at 4 rows). */
    threads(1);
    general = g;
    skinny = s;
    skinny_rows = rows;
    return 0;
}

/* Strides (row, column) of op(X) for a stored matrix with leading dimension ld. */
static void strides(int order, int trans, int ld, int64_t *rs, int64_t *cs) {
    int by_rows = (order == ROW_MAJOR) == (trans == NO_TRANS);
    *rs = by_rows ? ld : 1;
    *cs = by_rows ? 1 : ld;
}

void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    if (skinny == NULL || m > skinny_rows || m == 0 || n == 0) {
        if (general == NULL) {
            /* Preloaded without its variables: no library to compute with, and a product left
             * uncomputed would be a wrong answer given as a right one. */
            fprintf(stderr, "mlxrunner: cblas_sgemm called before mlxrunner_sgemm_init\n");
            abort();
        }
        general(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    int64_t rsa, csa, rsb, csb, rsc, csc;
    strides(order, transa, lda, &rsa, &csa);
    strides(order, transb, ldb, &rsb, &csb);
    strides(order, NO_TRANS, ldc, &rsc, &csc);
    skinny(0, 0, m, n, k, &alpha, a, rsa, csa, b, rsb, csb, &beta, c, rsc, csc);
}

/* Under LD_PRELOAD, where no one calls the init function. */
__attribute__((constructor)) static void init_from_environment(void) {
    const char *openblas = getenv("MLXRUNNER_SGEMM_OPENBLAS");
    const char *blis = getenv("MLXRUNNER_SGEMM_BLIS");
    const char *rows = getenv("MLXRUNNER_SGEMM_ROWS");
    if (openblas != NULL && blis != NULL && rows != NULL &&
        mlxrunner_sgemm_init(openblas, blis, atoi(rows)) != 0)
        fprintf(stderr, "mlxrunner: sgemm dispatch not set up from the environment\n");
}
