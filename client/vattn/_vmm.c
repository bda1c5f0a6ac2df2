/* vattn's mapping loop in native code: map a grant's pages and set their access
 * in one call that holds no Python lock.
 *
 * A grow of 64 pages is 64 cuMemMap calls and one cuMemSetAccess per run of
 * adjacent pages. Made one by one from Python, each call returns to the
 * interpreter and takes the GIL back; made here, the whole grant is one
 * foreign call (ctypes lets go of the GIL around it), so another thread of
 * the worker (vattn.session's courier, which makes the grant's call on the
 * fd channel) runs its Python beside the driver's work instead of between
 * its calls.
 *
 * No CUDA headers: the driver's entry points are passed in as addresses
 * (ctypes takes them from libcuda.so.1), with the prototypes below, which are
 * those of the CUDA driver API (CUresult is an int-sized enum, CUdeviceptr and
 * CUmemGenericAllocationHandle are unsigned long long). Built by setup.py
 * against Python's stable ABI and loaded with ctypes (vattn.native); the
 * loop itself knows no Python. It is also an (empty) importable module,
 * vattn._vmm, so that tools which import every submodule do not trip on it.
 */
#define Py_LIMITED_API 0x030A0000
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int (*vattn_map_fn)(unsigned long long ptr, size_t size, size_t offset, unsigned long long handle,
                            unsigned long long flags);
typedef int (*vattn_access_fn)(unsigned long long ptr, size_t size, const void *desc, size_t count);

/* Returned when the run buffer cannot be allocated (not a CUresult: those are >= 0). */
#define VATTN_ENOMEM (-12)
#define VATTN_STACK_PAGES 512

static int by_address(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Maps handles[i] at addrs[i] (page_size bytes each, in order), then sets the
 * access in desc (one CUmemAccessDesc) on every run of adjacent pages.
 *
 * Returns 0 (CUDA_SUCCESS) or the first error. *mapped is how many pages were
 * mapped: on a cuMemMap error, the index of the page that failed (pages before
 * it are mapped, it and those after are not); otherwise n (all are mapped, and
 * an error came from cuMemSetAccess, whose range is *failed_at). */
int vattn_map_pages(void *map_fn, void *access_fn, const uint64_t *addrs, const uint64_t *handles, size_t n,
                    size_t page_size, const void *desc, size_t *mapped, uint64_t *failed_at) {
    vattn_map_fn cu_map = (vattn_map_fn)map_fn;
    vattn_access_fn cu_access = (vattn_access_fn)access_fn;
    *mapped = 0;
    *failed_at = 0;
    if (n == 0)
        return 0;
    uint64_t stack[VATTN_STACK_PAGES];
    uint64_t *sorted = n <= VATTN_STACK_PAGES ? stack : malloc(n * sizeof(uint64_t));
    if (sorted == NULL)
        return VATTN_ENOMEM;
    int err = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        err = cu_map(addrs[i], page_size, 0, handles[i], 0);
        if (err != 0) {
            *mapped = i;
            *failed_at = addrs[i];
            goto out;
        }
    }
    *mapped = n;
    memcpy(sorted, addrs, n * sizeof(uint64_t));
    qsort(sorted, n, sizeof(uint64_t), by_address);
    uint64_t start = sorted[0], prev = sorted[0];
    for (i = 1; i <= n; i++) {
        if (i < n && sorted[i] == prev + page_size) {
            prev = sorted[i];
            continue;
        }
        err = cu_access(start, prev - start + page_size, desc, 1);
        if (err != 0) {
            *failed_at = start;
            goto out;
        }
        if (i < n)
            start = prev = sorted[i];
    }
out:
    if (sorted != stack)
        free(sorted);
    return err;
}

static struct PyModuleDef vattn_vmm_module = {
    PyModuleDef_HEAD_INIT, "_vmm",
    "vattn's native loops of CUDA driver calls: used through ctypes by vattn.native, nothing to call here.", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__vmm(void) { return PyModule_Create(&vattn_vmm_module); }
