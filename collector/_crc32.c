/*
 * tracemesh.collector._crc32: zlib's CRC-32 (the reflected 0xEDB88320 polynomial; the same values
 * as zlib.crc32, so the write-ahead log's format does not change), folded with carry-less
 * multiplication (PCLMULQDQ) where the CPU has it.
 *
 * Why it exists. The write-ahead log checksums every export it acknowledges (and every record it
 * reads back), under its lock. zlib's table-driven CRC runs at ~3 GB/s here: 0.26 us a span of
 * benchmarks/collector.py's, 128 us per 400 KB export, one export at a time. Folding 64 bytes per
 * step with PCLMULQDQ is the method of Intel's white paper "Fast CRC Computation for Generic
 * Polynomials Using PCLMULQDQ Instruction" (Gopal et al., 2009); the constants below are that
 * paper's for this polynomial in the bit-reflected domain (x^(k) mod P(x), reflected, for the fold
 * distances 512+64/512, 128+64/128 and 64, then P(x) and its Barrett quotient). What does not fill
 * a 16-byte lane, and everything on a CPU without the instruction, goes through a byte table.
 *
 * tests/collector/test_wal.py holds it to zlib.crc32 on random lengths, alignments and start values.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_FOLD 1
#include <immintrin.h>
#endif

static uint32_t table[256];

static void table_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0xEDB88320u : c >> 1;
        table[i] = c;
    }
}

/* s: the running register (the CRC's complement), as in zlib's inner loop */
static uint32_t by_table(uint32_t s, const uint8_t *p, size_t n) {
    while (n--)
        s = table[(s ^ *p++) & 0xff] ^ (s >> 8);
    return s;
}

#ifdef HAVE_FOLD
static int have_fold;

/* n: a multiple of 16, at least 64. */
__attribute__((target("pclmul,sse4.1"))) static uint32_t by_folding(uint32_t s, const uint8_t *p, size_t n) {
    const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);
    const __m128i k5 = _mm_set_epi64x(0, 0x0163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL); /* P(x), its Barrett quotient */
    const __m128i low32 = _mm_setr_epi32(~0, 0, ~0, 0);
    __m128i a = _mm_loadu_si128((const __m128i *)p), b = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i c = _mm_loadu_si128((const __m128i *)(p + 32)), d = _mm_loadu_si128((const __m128i *)(p + 48));
    a = _mm_xor_si128(a, _mm_cvtsi32_si128((int)s));
    p += 64;
    n -= 64;
    /* four lanes, each folded 512 bits forward per step */
    while (n >= 64) {
        __m128i al = _mm_clmulepi64_si128(a, k1k2, 0x00), bl = _mm_clmulepi64_si128(b, k1k2, 0x00);
        __m128i cl = _mm_clmulepi64_si128(c, k1k2, 0x00), dl = _mm_clmulepi64_si128(d, k1k2, 0x00);
        a = _mm_clmulepi64_si128(a, k1k2, 0x11);
        b = _mm_clmulepi64_si128(b, k1k2, 0x11);
        c = _mm_clmulepi64_si128(c, k1k2, 0x11);
        d = _mm_clmulepi64_si128(d, k1k2, 0x11);
        a = _mm_xor_si128(_mm_xor_si128(a, al), _mm_loadu_si128((const __m128i *)p));
        b = _mm_xor_si128(_mm_xor_si128(b, bl), _mm_loadu_si128((const __m128i *)(p + 16)));
        c = _mm_xor_si128(_mm_xor_si128(c, cl), _mm_loadu_si128((const __m128i *)(p + 32)));
        d = _mm_xor_si128(_mm_xor_si128(d, dl), _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    /* the four lanes into one, then what is left 128 bits at a time */
    __m128i lo;
    lo = _mm_clmulepi64_si128(a, k3k4, 0x00);
    a = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(a, k3k4, 0x11), lo), b);
    lo = _mm_clmulepi64_si128(a, k3k4, 0x00);
    a = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(a, k3k4, 0x11), lo), c);
    lo = _mm_clmulepi64_si128(a, k3k4, 0x00);
    a = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(a, k3k4, 0x11), lo), d);
    while (n >= 16) {
        lo = _mm_clmulepi64_si128(a, k3k4, 0x00);
        a = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(a, k3k4, 0x11), lo),
                          _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
    /* 128 bits to 64, 64 to 32, then Barrett's reduction to the 32-bit remainder */
    __m128i t = _mm_clmulepi64_si128(a, k3k4, 0x10);
    a = _mm_xor_si128(_mm_srli_si128(a, 8), t);
    t = _mm_srli_si128(a, 4);
    a = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(a, low32), k5, 0x00), t);
    t = _mm_and_si128(a, low32);
    t = _mm_clmulepi64_si128(t, poly, 0x10);
    t = _mm_and_si128(t, low32);
    t = _mm_clmulepi64_si128(t, poly, 0x00);
    a = _mm_xor_si128(a, t);
    return (uint32_t)_mm_extract_epi32(a, 1);
}
#endif

static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n) {
    uint32_t s = ~crc;
#ifdef HAVE_FOLD
    if (have_fold && n >= 64) {
        size_t m = n & ~(size_t)15;
        s = by_folding(s, p, m);
        p += m;
        n -= m;
    }
#endif
    return ~by_table(s, p, n);
}

/* Below this many bytes the GIL is kept (releasing it costs more than the CRC). */
#define GIL_FREE_BYTES 16384

PyDoc_STRVAR(crc32_doc, "crc32(data, value=0, /) -> int\n\n"
                        "zlib.crc32(data, value): the same CRC-32, faster on CPUs with PCLMULQDQ.");

static PyObject *py_crc32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "crc32() takes data and an optional start value");
        return NULL;
    }
    uint32_t value = 0;
    if (nargs == 2) {
        unsigned long v = PyLong_AsUnsignedLongMask(args[1]);
        if (v == (unsigned long)-1 && PyErr_Occurred())
            return NULL;
        value = (uint32_t)v;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *p = view.buf;
    size_t n = (size_t)view.len;
    if (n >= GIL_FREE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        value = crc32_update(value, p, n);
        Py_END_ALLOW_THREADS
    } else {
        value = crc32_update(value, p, n);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(value);
}

static PyObject *py_folding(PyObject *self, PyObject *unused) {
#ifdef HAVE_FOLD
    return PyBool_FromLong(have_fold);
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"crc32", (PyCFunction)(void (*)(void))py_crc32, METH_FASTCALL, crc32_doc},
    {"folding", py_folding, METH_NOARGS, "True when this CPU folds with PCLMULQDQ (else a byte table)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_crc32", "zlib's CRC-32, folded with PCLMULQDQ.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__crc32(void) {
    table_init();
#ifdef HAVE_FOLD
    __builtin_cpu_init();
    have_fold = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
    if (getenv("TRACEMESH_CRC32_TABLE"))
        have_fold = 0;
#endif
    return PyModule_Create(&module);
}
