/*
 * tracemesh.collector._otlpc: OTLP trace export requests, from their protobuf bytes, checked and
 * turned into one ClickHouse ``Native`` block for ``otel_traces``.
 *
 * Why it exists. Before it, a trace export cost the collector ~3-7 us a span in Python (upb parses
 * the request, Python checks every span's ids before the export is acknowledged) and then ~12 us a
 * span in ClickHouse (its Protobuf input format and an INSERT ... SELECT rendering the columns, plus
 * ~0.2 s of planning per insert): 32-34k spans per CPU-second against 140-169k rows per CPU-second
 * for inserting the finished rows alone. This module does both jobs in C on the raw bytes, with no
 * parse tree: ``check`` (~0.33 us a span of benchmarks/collector.py's, against ~2.6-3 us for upb and
 * the Python checks) and ``encode`` (~0.9 us a span; ~1.05 us when it validates the bytes again), and
 * ClickHouse only stores a block whose columns are already rendered, its LowCardinality columns
 * already dictionary-encoded (see lcdict; the README says what the collector does with it end to end).
 *
 * The Python encoder (_encode.py: encode_traces, _span_problem, value_str, format_double) is the
 * reference: the rows produced here must be exactly its rows, and the refusals exactly its refusals,
 * with the same messages; tests/collector/test_native.py checks both on hypothesis-random requests
 * and a zoo of awkward values. The wire decoding accepts and rejects exactly what upb (protobuf's
 * Python runtime) does, which tests/collector/test_otlpc.py checks on random and mutated inputs:
 *   - tags are varints of at most 5 bytes and at most 2**32-1, field number 0 is an error;
 *   - varint values take at most 10 bytes; lengths at most 5 bytes and must fit what is left;
 *   - wire types 6 and 7 are errors; an end-group outside its group is an error; groups (of unknown
 *     fields) must end with the matching field number;
 *   - a known field sent with another wire type is an unknown field (skipped, not checked);
 *   - string fields must be valid UTF-8 (no overlong forms, surrogates or code points past
 *     U+10FFFF); bytes fields are not checked;
 *   - messages and groups nest at most 100 deep below the request (upb's default limit);
 *   - a singular message field seen twice is merged (as if concatenated); within a oneof, setting
 *     another member discards the previous one; for scalars the last value wins.
 *
 * Robustness: every read is bounds-checked by the validating pass before the decoding pass reads the
 * same bytes, recursion is bounded by the depth limit, sizes are checked for overflow, and memory
 * failures are sticky flags that end in MemoryError, never in a crash. The GIL is released while
 * checking and encoding; doubles are formatted without Python (shortest round-trip digits found with
 * snprintf/strtod, as repr finds them).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#define MAX_DEPTH 100
#define MAX_TIME_NS 0x7fffffffffffffffULL
#define MAX_REASONS 3

static PyObject *DecodeError;

/* ------------------------------------------------------------------------------------------ */
/* growable buffers; a failed allocation sets a sticky flag and later writes are dropped        */

typedef struct {
    uint8_t *p;
    size_t n, cap;
} buf_t;

static int buf_grow(buf_t *b, size_t extra, int *oom);

static inline __attribute__((always_inline)) int buf_reserve(buf_t *b, size_t extra, int *oom) {
    if (extra <= b->cap - b->n && !*oom)
        return 1;
    return buf_grow(b, extra, oom);
}

static int buf_grow(buf_t *b, size_t extra, int *oom) {
    if (*oom)
        return 0;
    if (extra > SIZE_MAX / 2 - b->n) {
        *oom = 1;
        return 0;
    }
    size_t need = b->n + extra;
    if (need <= b->cap)
        return 1;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    uint8_t *np = realloc(b->p, cap);
    if (!np) {
        *oom = 1;
        return 0;
    }
    b->p = np;
    b->cap = cap;
    return 1;
}

static __attribute__((noinline)) void copy_big(uint8_t *d, const uint8_t *s, size_t n) { memcpy(d, s, n); }

/* copy n bytes; short strings (most keys and values) without a call to memcpy */
static inline __attribute__((always_inline)) void copy_small(uint8_t *d, const uint8_t *s, size_t n) {
    if (n >= 8 && n <= 16) {
        uint64_t a, b;
        memcpy(&a, s, 8);
        memcpy(&b, s + n - 8, 8);
        memcpy(d, &a, 8);
        memcpy(d + n - 8, &b, 8);
    } else if (n >= 4 && n < 8) {
        uint32_t a, b;
        memcpy(&a, s, 4);
        memcpy(&b, s + n - 4, 4);
        memcpy(d, &a, 4);
        memcpy(d + n - 4, &b, 4);
    } else if (n < 4) {
        for (size_t i = 0; i < n; i++)
            d[i] = s[i];
    } else {
        copy_big(d, s, n);
    }
}

static inline __attribute__((always_inline)) void buf_put(buf_t *b, const void *src, size_t n, int *oom) {
    if (!n || !buf_reserve(b, n, oom))
        return;
    copy_small(b->p + b->n, (const uint8_t *)src, n);
    b->n += n;
}

static inline void buf_u64(buf_t *b, uint64_t v, int *oom) {
    if (!buf_reserve(b, 8, oom))
        return;
    for (int i = 0; i < 8; i++)
        b->p[b->n + i] = (uint8_t)(v >> (8 * i));
    b->n += 8;
}

static inline __attribute__((always_inline)) void buf_u32(buf_t *b, uint32_t v, int *oom) {
    if (!buf_reserve(b, 4, oom))
        return;
    memcpy(b->p + b->n, &v, 4);
    b->n += 4;
}

static inline __attribute__((always_inline)) void buf_varint(buf_t *b, uint64_t v, int *oom) {
    if (!buf_reserve(b, 10, oom))
        return;
    while (v >= 0x80) {
        b->p[b->n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    b->p[b->n++] = (uint8_t)v;
}

/* a ClickHouse String: varint length, bytes */
static inline __attribute__((always_inline)) void buf_str(buf_t *b, const uint8_t *s, size_t n, int *oom) {
    buf_varint(b, n, oom);
    buf_put(b, s, n, oom);
}

/* a growable array of `elem`-byte items with twice the room (`first` items at first): the new
 * pointer, with *cap updated; NULL and *oom set when memory runs out (the old array stays) */
static __attribute__((noinline)) void *grow_array(void *p, size_t *cap, size_t elem, size_t first, int *oom) {
    size_t nc = *cap ? *cap * 2 : first;
    void *np = nc > SIZE_MAX / elem / 2 ? NULL : realloc(p, nc * elem);
    if (!np) {
        *oom = 1;
        return NULL;
    }
    *cap = nc;
    return np;
}

static void buf_free(buf_t *b) {
    free(b->p);
    b->p = NULL;
    b->n = b->cap = 0;
}

/* ------------------------------------------------------------------------------------------ */
/* pass 1: validation, exactly as upb accepts or rejects                                       */

enum { F_UNKNOWN = 0, F_VARINT, F_FIXED64, F_FIXED32, F_BYTES, F_STRING, F_MSG };
enum { M_NONE = 0, M_REQ, M_RS, M_RES, M_KV, M_AV, M_ARR, M_KVL, M_ENT, M_SS, M_SCOPE, M_SPAN, M_EVENT, M_LINK, M_STATUS };

typedef struct {
    uint8_t kind, sub;
} fdesc;

#define FD(k, s) \
    do {         \
        d.kind = (k); \
        d.sub = (s); \
    } while (0)

static fdesc lookup(int m, uint32_t f) {
    fdesc d = {F_UNKNOWN, M_NONE};
    switch (m) {
    case M_REQ:
        if (f == 1) FD(F_MSG, M_RS);
        break;
    case M_RS:
        if (f == 1) FD(F_MSG, M_RES);
        else if (f == 2) FD(F_MSG, M_SS);
        else if (f == 3) FD(F_STRING, 0);
        break;
    case M_RES:
        if (f == 1) FD(F_MSG, M_KV);
        else if (f == 2) FD(F_VARINT, 0);
        else if (f == 3) FD(F_MSG, M_ENT);
        break;
    case M_KV:
        if (f == 1) FD(F_STRING, 0);
        else if (f == 2) FD(F_MSG, M_AV);
        else if (f == 3) FD(F_VARINT, 0);
        break;
    case M_AV:
        switch (f) {
        case 1: FD(F_STRING, 0); break;
        case 2: case 3: case 8: FD(F_VARINT, 0); break;
        case 4: FD(F_FIXED64, 0); break;
        case 5: FD(F_MSG, M_ARR); break;
        case 6: FD(F_MSG, M_KVL); break;
        case 7: FD(F_BYTES, 0); break;
        }
        break;
    case M_ARR:
        if (f == 1) FD(F_MSG, M_AV);
        break;
    case M_KVL:
        if (f == 1) FD(F_MSG, M_KV);
        break;
    case M_ENT:
        if (f >= 1 && f <= 4) FD(F_STRING, 0);
        break;
    case M_SS:
        if (f == 1) FD(F_MSG, M_SCOPE);
        else if (f == 2) FD(F_MSG, M_SPAN);
        else if (f == 3) FD(F_STRING, 0);
        break;
    case M_SCOPE:
        if (f == 1 || f == 2) FD(F_STRING, 0);
        else if (f == 3) FD(F_MSG, M_KV);
        else if (f == 4) FD(F_VARINT, 0);
        break;
    case M_SPAN:
        switch (f) {
        case 1: case 2: case 4: FD(F_BYTES, 0); break;
        case 3: case 5: FD(F_STRING, 0); break;
        case 6: case 10: case 12: case 14: FD(F_VARINT, 0); break;
        case 7: case 8: FD(F_FIXED64, 0); break;
        case 9: FD(F_MSG, M_KV); break;
        case 11: FD(F_MSG, M_EVENT); break;
        case 13: FD(F_MSG, M_LINK); break;
        case 15: FD(F_MSG, M_STATUS); break;
        case 16: FD(F_FIXED32, 0); break;
        }
        break;
    case M_EVENT:
        if (f == 1) FD(F_FIXED64, 0);
        else if (f == 2) FD(F_STRING, 0);
        else if (f == 3) FD(F_MSG, M_KV);
        else if (f == 4) FD(F_VARINT, 0);
        break;
    case M_LINK:
        switch (f) {
        case 1: case 2: FD(F_BYTES, 0); break;
        case 3: FD(F_STRING, 0); break;
        case 4: FD(F_MSG, M_KV); break;
        case 5: FD(F_VARINT, 0); break;
        case 6: FD(F_FIXED32, 0); break;
        }
        break;
    case M_STATUS:
        if (f == 2) FD(F_STRING, 0);
        else if (f == 3) FD(F_VARINT, 0);
        break;
    }
    return d;
}

static const int WIRE_OF_KIND[] = {-1, 0, 1, 5, 2, 2, 2};

/* lookup() as a table, filled at import: every known field number is at most 16 */
#define N_MSG (M_STATUS + 1)
#define MAX_FIELD 16
static fdesc FIELDS[N_MSG][MAX_FIELD + 1];

static void fill_fields(void) {
    for (int m = 0; m < N_MSG; m++)
        for (uint32_t f = 0; f <= MAX_FIELD; f++)
            FIELDS[m][f] = lookup(m, f);
}

typedef struct {
    const uint8_t *base;
    const char *err;
    size_t errpos;
} vctx;

static int verr(vctx *c, const uint8_t *at, const char *msg) {
    if (!c->err) {
        c->err = msg;
        c->errpos = (size_t)(at - c->base);
    }
    return -1;
}

/* 0 ok, -1 truncated, -2 too long */
static inline __attribute__((always_inline)) int rd_varint(const uint8_t **pp, const uint8_t *end, int maxbytes,
                                                         uint64_t *out) {
    const uint8_t *p = *pp;
    if (p < end && *p < 0x80) {
        *out = *p;
        *pp = p + 1;
        return 0;
    }
    uint64_t v = 0;
    for (int i = 0; i < maxbytes; i++) {
        if (p >= end)
            return -1;
        uint8_t b = *p++;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *pp = p;
            *out = v;
            return 0;
        }
    }
    return -2;
}

static int utf8_ok(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ULL)
                break;
            i += 8;
        }
        if (i >= n)
            break;
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c < 0xC2)
            return 0;
        if (c < 0xE0) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80)
                return 0;
            i += 2;
            continue;
        }
        if (c < 0xF0) {
            if (i + 2 >= n)
                return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80)
                return 0;
            if (c == 0xE0 && c1 < 0xA0)
                return 0;
            if (c == 0xED && c1 >= 0xA0)
                return 0;
            i += 3;
            continue;
        }
        if (c < 0xF5) {
            if (i + 3 >= n)
                return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2], c3 = s[i + 3];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80 || (c3 & 0xC0) != 0x80)
                return 0;
            if (c == 0xF0 && c1 < 0x90)
                return 0;
            if (c == 0xF4 && c1 >= 0x90)
                return 0;
            i += 4;
            continue;
        }
        return 0;
    }
    return 1;
}

/* utf8_ok, with ASCII strings of up to 64 bytes (nearly all keys and values) decided by OR-ing
 * their 8-byte words (the last one overlapping), without a branch per word */
static inline __attribute__((always_inline)) int utf8_short(const uint8_t *s, size_t n) {
    if (n >= 8 && n <= 64) {
        uint64_t acc, w;
        memcpy(&acc, s + n - 8, 8);
        for (size_t i = 0; i + 8 <= n; i += 8) {
            memcpy(&w, s + i, 8);
            acc |= w;
        }
        if (!(acc & 0x8080808080808080ULL))
            return 1;
    } else if (n >= 4 && n < 8) {
        uint32_t a, b;
        memcpy(&a, s, 4);
        memcpy(&b, s + n - 4, 4);
        if (!((a | b) & 0x80808080U))
            return 1;
    } else if (n < 4) {
        uint8_t o = 0;
        for (size_t i = 0; i < n; i++)
            o |= s[i];
        if (!(o & 0x80))
            return 1;
    }
    return utf8_ok(s, n);
}

/* a slice of the request's bytes */
typedef struct {
    const uint8_t *p;
    size_t n;
} sv;

/* The framing of a KeyValue in its common shape: a key (field 1), then a value (field 2) that ends
 * the KeyValue, both lengths under 128. 1 with the key's bytes and the value's (an AnyValue's
 * fields); 0 for any other framing. Reads only within [p, p + n). */
static inline __attribute__((always_inline)) int kv_frame(const uint8_t *p, size_t n, sv *key, sv *val) {
    if (n < 4 || p[0] != 0x0A || p[1] >= 0x80)
        return 0;
    size_t kn = p[1];
    if (n < 4 + kn)
        return 0;
    const uint8_t *v = p + 2 + kn;
    size_t an = n - 4 - kn; /* the value must end the KeyValue */
    if (v[0] != 0x12 || v[1] >= 0x80 || (size_t)v[1] != an)
        return 0;
    key->p = p + 2;
    key->n = kn;
    val->p = v + 2;
    val->n = an;
    return 1;
}

/* A KeyValue in its common shape (kv_frame), its value holding nothing or one string, bool, int or
 * double, checked straight through. 1: valid, exactly as validate() would find it; 0: another
 * shape, or invalid: validate() decides (and words the error). Most of a span's fields are its
 * attributes'; checking benchmarks/collector.py's requests went from 0.63-0.65 to 0.51-0.52 us a
 * span with this, to 0.41-0.43 with utf8_short up to 16 bytes and to 0.31-0.33 up to 64
 * (2026-11-27, 3 alternated pairs each). */
static inline __attribute__((always_inline)) int kv_fast(const uint8_t *p, const uint8_t *e) {
    sv key, val;
    if (!kv_frame(p, (size_t)(e - p), &key, &val))
        return 0;
    const uint8_t *a = val.p;
    size_t an = val.n;
    if (an) {
        switch (a[0]) {
        case 0x0A: /* string_value */
            if (an < 2 || a[1] >= 0x80 || (size_t)a[1] != an - 2 || !utf8_short(a + 2, an - 2))
                return 0;
            break;
        case 0x10: /* bool_value */
        case 0x18: /* int_value: a varint of at most 10 bytes that ends the value */
            if (an < 2 || an > 11 || a[an - 1] >= 0x80)
                return 0;
            for (size_t i = 1; i + 1 < an; i++)
                if (a[i] < 0x80)
                    return 0;
            break;
        case 0x21: /* double_value */
            if (an != 9)
                return 0;
            break;
        default:
            return 0;
        }
    }
    return utf8_short(key.p, key.n);
}

/* Validate the fields from *pp to end as message type m (M_NONE: the contents of an unknown group,
 * ended by the end-group tag of field `group`). depth: nesting of this message below the request. */
static int validate(vctx *c, int m, const uint8_t **pp, const uint8_t *end, int depth, uint32_t group) {
    const uint8_t *p = *pp;
    for (;;) {
        if (p >= end) {
            if (group)
                return verr(c, p, "a group is not terminated");
            *pp = p;
            return 0;
        }
        const uint8_t *at = p;
        uint64_t tag;
        int r = rd_varint(&p, end, 5, &tag);
        if (r == -1)
            return verr(c, at, "truncated tag");
        if (r == -2 || tag > 0xffffffffULL)
            return verr(c, at, "a tag is too long");
        uint32_t fnum = (uint32_t)(tag >> 3), wt = (uint32_t)(tag & 7);
        if (fnum == 0)
            return verr(c, at, "field number 0");
        if (wt == 4) {
            if (group && fnum == group) {
                *pp = p;
                return 0;
            }
            return verr(c, at, "an end-group tag without its group");
        }
        fdesc d = fnum <= MAX_FIELD ? FIELDS[m][fnum] : (fdesc){F_UNKNOWN, M_NONE};
        if (d.kind != F_UNKNOWN && WIRE_OF_KIND[d.kind] != (int)wt)
            d.kind = F_UNKNOWN; /* another wire type: an unknown field, as protobuf treats it */
        uint64_t v;
        switch (wt) {
        case 0:
            r = rd_varint(&p, end, 10, &v);
            if (r == -1)
                return verr(c, at, "truncated varint");
            if (r == -2)
                return verr(c, at, "a varint is longer than 10 bytes");
            break;
        case 1:
            if ((size_t)(end - p) < 8)
                return verr(c, at, "truncated fixed64");
            p += 8;
            break;
        case 5:
            if ((size_t)(end - p) < 4)
                return verr(c, at, "truncated fixed32");
            p += 4;
            break;
        case 2: {
            r = rd_varint(&p, end, 5, &v);
            if (r == -1)
                return verr(c, at, "truncated length");
            if (r == -2)
                return verr(c, at, "a length is longer than 5 bytes");
            if (v > (uint64_t)(end - p))
                return verr(c, at, "a length runs past the end of its message");
            const uint8_t *q = p, *qe = p + v;
            if (d.kind == F_STRING) {
                if (!utf8_short(q, (size_t)v))
                    return verr(c, at, "a string field is not valid UTF-8");
            } else if (d.kind == F_MSG) {
                if (depth + 1 > MAX_DEPTH)
                    return verr(c, at, "messages nested more than 100 deep");
                if (d.sub == M_KV && depth + 2 <= MAX_DEPTH && kv_fast(q, qe))
                    ; /* an attribute of the common shape: valid */
                else if (validate(c, d.sub, &q, qe, depth + 1, 0))
                    return -1;
            }
            p = qe;
            break;
        }
        case 3:
            if (depth + 1 > MAX_DEPTH)
                return verr(c, at, "groups nested more than 100 deep");
            if (validate(c, M_NONE, &p, end, depth + 1, fnum))
                return -1;
            break;
        default:
            return verr(c, at, "invalid wire type");
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* pass 2: reading validated bytes                                                            */

/* The readers below never read past `end`, whatever the bytes: encode(..., checked=True) walks
 * payloads without validating them again, and what is malformed then ends a message early or
 * yields garbage values, never a read out of bounds. On validated bytes they read exactly what
 * the wire says. */
static inline __attribute__((always_inline)) uint64_t uv(const uint8_t **pp, const uint8_t *end) {
    const uint8_t *p = *pp;
    if (p < end && *p < 0x80) {
        *pp = p + 1;
        return *p;
    }
    uint64_t v = 0;
    int s = 0;
    while (p < end) {
        uint8_t b = *p++;
        if (s < 64)
            v |= (uint64_t)(b & 0x7f) << s;
        s += 7;
        if (!(b & 0x80))
            break;
    }
    *pp = p;
    return v;
}

static inline uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* One field of a message: its tag (number and wire type), and its value. */
typedef struct {
    uint32_t tag;
    uint64_t u; /* varint, fixed64, fixed32 */
    sv ld;      /* length-delimited */
} field_t;

static inline __attribute__((always_inline)) int next_field(const uint8_t **pp, const uint8_t *end, field_t *f) {
    const uint8_t *p = *pp;
    if (p >= end)
        return 0;
    f->tag = (uint32_t)uv(&p, end);
    f->u = 0;
    f->ld.p = p;
    f->ld.n = 0;
    switch (f->tag & 7) {
    case 0:
        f->u = uv(&p, end);
        break;
    case 1:
        if ((size_t)(end - p) < 8)
            goto bad;
        f->u = le64(p);
        p += 8;
        break;
    case 5:
        if ((size_t)(end - p) < 4)
            goto bad;
        f->u = (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24;
        p += 4;
        break;
    case 2: {
        uint64_t n = uv(&p, end);
        if (n > (uint64_t)(end - p))
            goto bad;
        f->ld.p = p;
        f->ld.n = (size_t)n;
        p += n;
        break;
    }
    case 3: { /* an unknown group: skip to its matching end */
        size_t level = 1;
        while (level && p < end) {
            uint32_t t = (uint32_t)uv(&p, end);
            switch (t & 7) {
            case 0: uv(&p, end); break;
            case 1: if ((size_t)(end - p) < 8) goto bad; p += 8; break;
            case 5: if ((size_t)(end - p) < 4) goto bad; p += 4; break;
            case 2: {
                uint64_t n = uv(&p, end);
                if (n > (uint64_t)(end - p))
                    goto bad;
                p += n;
                break;
            }
            case 3: level++; break;
            case 4: level--; break;
            default: goto bad;
            }
        }
        if (level)
            goto bad;
        break;
    }
    default:
        goto bad;
    }
    *pp = p;
    return 1;
bad: /* only on bytes that were not validated: the message ends here */
    *pp = end;
    return 0;
}

#define TAG(num, wt) (((uint32_t)(num) << 3) | (wt))

/* A list of segments: the occurrences of a singular message field, merged in order. */
typedef struct {
    sv inl[2];
    sv *heap;
    size_t n, cap;
} segvec;

static void seg_init(segvec *s) {
    s->heap = NULL;
    s->n = 0;
    s->cap = 2;
}

static inline sv seg_at(const segvec *s, size_t i) { return s->heap ? s->heap[i] : s->inl[i]; }

static void seg_push(segvec *s, sv x, int *oom) {
    if (*oom)
        return;
    if (s->n == s->cap) {
        if (s->cap > SIZE_MAX / (4 * sizeof(sv))) {
            *oom = 1;
            return;
        }
        size_t cap = s->cap * 2;
        sv *h = s->heap ? realloc(s->heap, cap * sizeof(sv)) : malloc(cap * sizeof(sv));
        if (!h) {
            *oom = 1;
            return;
        }
        if (!s->heap)
            memcpy(h, s->inl, sizeof s->inl);
        s->heap = h;
        s->cap = cap;
    }
    if (s->heap)
        s->heap[s->n++] = x;
    else
        s->inl[s->n++] = x;
}

static void seg_free(segvec *s) {
    free(s->heap);
    seg_init(s);
}

/* AnyValue, merged over its occurrences */
enum { AV_NONE = 0, AV_STR = 1, AV_BOOL = 2, AV_INT = 3, AV_DOUBLE = 4, AV_ARR = 5, AV_KVL = 6, AV_BYTES = 7, AV_STRIDX = 8 };

typedef struct {
    int which;
    sv s;
    uint64_t u;
    segvec sub; /* ArrayValue / KeyValueList occurrences */
} anyval;

static void av_feed(anyval *a, sv seg, int *oom) {
    const uint8_t *p = seg.p, *e = seg.p + seg.n;
    field_t f;
    while (next_field(&p, e, &f)) {
        switch (f.tag) {
        case TAG(1, 2): a->which = AV_STR; a->s = f.ld; break;
        case TAG(2, 0): a->which = AV_BOOL; a->u = f.u; break;
        case TAG(3, 0): a->which = AV_INT; a->u = f.u; break;
        case TAG(4, 1): a->which = AV_DOUBLE; a->u = f.u; break;
        case TAG(7, 2): a->which = AV_BYTES; a->s = f.ld; break;
        case TAG(8, 0): a->which = AV_STRIDX; a->u = f.u; break;
        case TAG(5, 2):
        case TAG(6, 2): {
            int w = f.tag == TAG(5, 2) ? AV_ARR : AV_KVL;
            if (a->which != w)
                a->sub.n = 0;
            a->which = w;
            seg_push(&a->sub, f.ld, oom);
            break;
        }
        }
    }
}

/* KeyValue: key (last wins) and its value's occurrences */
static void kv_parse(sv seg, sv *key, anyval *a, int *oom) {
    const uint8_t *p = seg.p, *e = seg.p + seg.n;
    field_t f;
    key->p = (const uint8_t *)"";
    key->n = 0;
    while (next_field(&p, e, &f)) {
        if (f.tag == TAG(1, 2))
            *key = f.ld;
        else if (f.tag == TAG(2, 2))
            av_feed(a, f.ld, oom);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* rendering values as _encode.value_str does                                                 */

static const char HEX[] = "0123456789abcdef";

static void put_hex(buf_t *b, sv s, int *oom) {
    buf_varint(b, s.n * 2, oom);
    if (!buf_reserve(b, s.n * 2, oom))
        return;
    uint8_t *o = b->p + b->n;
    for (size_t i = 0; i < s.n; i++) {
        o[2 * i] = HEX[s.p[i] >> 4];
        o[2 * i + 1] = HEX[s.p[i] & 15];
    }
    b->n += s.n * 2;
}

static int all_zero(sv s) {
    for (size_t i = 0; i < s.n; i++)
        if (s.p[i])
            return 0;
    return 1;
}

static void put_base64(buf_t *b, sv s, int *oom) {
    static const char A[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t out = (s.n + 2) / 3 * 4;
    if (!buf_reserve(b, out, oom))
        return;
    uint8_t *o = b->p + b->n;
    size_t i = 0, j = 0;
    for (; i + 3 <= s.n; i += 3) {
        uint32_t v = (uint32_t)s.p[i] << 16 | (uint32_t)s.p[i + 1] << 8 | s.p[i + 2];
        o[j++] = A[v >> 18];
        o[j++] = A[(v >> 12) & 63];
        o[j++] = A[(v >> 6) & 63];
        o[j++] = A[v & 63];
    }
    if (s.n - i == 1) {
        uint32_t v = (uint32_t)s.p[i] << 16;
        o[j++] = A[v >> 18];
        o[j++] = A[(v >> 12) & 63];
        o[j++] = '=';
        o[j++] = '=';
    } else if (s.n - i == 2) {
        uint32_t v = (uint32_t)s.p[i] << 16 | (uint32_t)s.p[i + 1] << 8;
        o[j++] = A[v >> 18];
        o[j++] = A[(v >> 12) & 63];
        o[j++] = A[(v >> 6) & 63];
        o[j++] = '=';
    }
    b->n += j;
}

static void put_cstr(buf_t *b, const char *s, int *oom) { buf_put(b, s, strlen(s), oom); }

static void put_i64(buf_t *b, int64_t v, int *oom) {
    char tmp[24];
    int n = sizeof tmp;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[--n] = (char)('0' + (int)(u % 10));
        u /= 10;
    } while (u);
    if (v < 0)
        tmp[--n] = '-';
    buf_put(b, tmp + n, sizeof tmp - (size_t)n, oom);
}

/* Shortest round-trip digits of finite v > 0, as repr (dtoa mode 0) finds them: digits without
 * leading or trailing zeros, and decpt such that v = 0.DIGITS * 10**decpt. */
static int shortest_digits(double v, char *digits, int *decpt) {
    char buf[48];
    for (int p = 1; p <= 17; p++) {
        snprintf(buf, sizeof buf, "%.*e", p - 1, v);
        double back = strtod(buf, NULL);
        if (back != v && back < v) {
            /* the nearest p-digit decimal is below v and outside the (asymmetric, at a power of
             * two) rounding interval; the next one up may be inside it */
            char m[24];
            int nd = 0, e;
            char *q = buf;
            for (; *q && *q != 'e'; q++)
                if (*q >= '0' && *q <= '9')
                    m[nd++] = *q;
            e = atoi(q + 1);
            int k = nd - 1;
            while (k >= 0 && m[k] == '9')
                m[k--] = '0';
            if (k < 0) {
                m[0] = '1';
                for (int i = 1; i < nd; i++)
                    m[i] = '0';
                e++;
            } else {
                m[k]++;
            }
            char cand[48];
            int cn = 0;
            cand[cn++] = m[0];
            if (nd > 1) {
                cand[cn++] = '.';
                for (int i = 1; i < nd; i++)
                    cand[cn++] = m[i];
            }
            snprintf(cand + cn, sizeof cand - cn, "e%d", e);
            if (strtod(cand, NULL) == v) {
                memcpy(buf, cand, sizeof cand);
                back = v;
            }
        }
        if (back == v) {
            int nd = 0;
            char *q = buf;
            for (; *q && *q != 'e'; q++)
                if (*q >= '0' && *q <= '9')
                    digits[nd++] = *q;
            int e = atoi(q + 1);
            while (nd > 1 && digits[nd - 1] == '0')
                nd--;
            digits[nd] = 0;
            *decpt = e + 1;
            return nd;
        }
    }
    /* unreachable: 17 significant digits always round-trip */
    snprintf(buf, sizeof buf, "%.16e", v);
    int nd = 0;
    char *q = buf;
    for (; *q && *q != 'e'; q++)
        if (*q >= '0' && *q <= '9')
            digits[nd++] = *q;
    digits[nd] = 0;
    *decpt = atoi(q + 1) + 1;
    return nd;
}

/* digits d[0..nd) with the decimal point after decpt of them, in positional notation (no
 * exponent): "0.000ddd", "ddd000" followed by int_suffix (".0" for Python's repr, "" for Go's), or
 * "dd.ddd" */
static void put_positional(buf_t *b, const char *d, int nd, int decpt, const char *int_suffix, int *oom) {
    if (decpt <= 0) {
        put_cstr(b, "0.", oom);
        for (int i = 0; i < -decpt; i++)
            put_cstr(b, "0", oom);
        buf_put(b, d, (size_t)nd, oom);
    } else if (decpt >= nd) {
        buf_put(b, d, (size_t)nd, oom);
        for (int i = 0; i < decpt - nd; i++)
            put_cstr(b, "0", oom);
        put_cstr(b, int_suffix, oom);
    } else {
        buf_put(b, d, (size_t)decpt, oom);
        put_cstr(b, ".", oom);
        buf_put(b, d + decpt, (size_t)(nd - decpt), oom);
    }
}

/* format_double: Go's FormatFloat(v, 'f', -1, 64) */
static void put_go_double(buf_t *b, double v, int *oom) {
    if (isnan(v)) {
        put_cstr(b, "NaN", oom);
        return;
    }
    if (isinf(v)) {
        put_cstr(b, v > 0 ? "+Inf" : "-Inf", oom);
        return;
    }
    if (signbit(v))
        put_cstr(b, "-", oom);
    v = fabs(v);
    if (v == 0) {
        put_cstr(b, "0", oom);
        return;
    }
    char d[24];
    int decpt, nd = shortest_digits(v, d, &decpt);
    put_positional(b, d, nd, decpt, "", oom);
}

/* a double inside JSON, as _json_value and json.dumps write it */
static void put_json_double(buf_t *b, double v, int *oom) {
    if (!isfinite(v)) {
        put_cstr(b, "\"", oom);
        put_go_double(b, v, oom);
        put_cstr(b, "\"", oom);
        return;
    }
    double a = fabs(v);
    if (a < 1e21 && floor(v) == v) { /* int(d): exact */
        if (a < 9.2e18) {
            put_i64(b, (int64_t)v, oom);
        } else {
            unsigned __int128 x = (unsigned __int128)a;
            char tmp[48];
            int n = 0;
            while (x) {
                tmp[n++] = (char)('0' + (int)(x % 10));
                x /= 10;
            }
            if (v < 0)
                put_cstr(b, "-", oom);
            for (int i = n - 1; i >= 0; i--)
                buf_put(b, &tmp[i], 1, oom);
        }
        return;
    }
    /* repr(float) */
    if (signbit(v))
        put_cstr(b, "-", oom);
    char d[24];
    int decpt, nd = shortest_digits(a, d, &decpt);
    if (decpt > -4 && decpt <= 16) {
        put_positional(b, d, nd, decpt, ".0", oom);
    } else {
        buf_put(b, d, 1, oom);
        if (nd > 1) {
            put_cstr(b, ".", oom);
            buf_put(b, d + 1, (size_t)(nd - 1), oom);
        }
        char tmp[16];
        int e = decpt - 1;
        int n = snprintf(tmp, sizeof tmp, "e%c%02d", e < 0 ? '-' : '+', e < 0 ? -e : e);
        buf_put(b, tmp, (size_t)n, oom);
    }
}

/* a JSON string as json.dumps(ensure_ascii=False) writes it, with Go's HTML and U+2028/9 escapes */
static void put_json_str(buf_t *b, sv s, int *oom) {
    put_cstr(b, "\"", oom);
    size_t run = 0;
    for (size_t i = 0; i < s.n; i++) {
        uint8_t c = s.p[i];
        const char *esc = NULL;
        char tmp[8];
        size_t skip = 1;
        if (c == '"') esc = "\\\"";
        else if (c == '\\') esc = "\\\\";
        else if (c == '\n') esc = "\\n";
        else if (c == '\r') esc = "\\r";
        else if (c == '\t') esc = "\\t";
        else if (c == '\b') esc = "\\b";
        else if (c == '\f') esc = "\\f";
        else if (c < 0x20) {
            snprintf(tmp, sizeof tmp, "\\u%04x", c);
            esc = tmp;
        } else if (c == '<') esc = "\\u003c";
        else if (c == '>') esc = "\\u003e";
        else if (c == '&') esc = "\\u0026";
        else if (c == 0xE2 && i + 2 < s.n && s.p[i + 1] == 0x80 && (s.p[i + 2] == 0xA8 || s.p[i + 2] == 0xA9)) {
            esc = s.p[i + 2] == 0xA8 ? "\\u2028" : "\\u2029";
            skip = 3;
        }
        if (esc) {
            buf_put(b, s.p + i - run, run, oom);
            run = 0;
            put_cstr(b, esc, oom);
            i += skip - 1;
        } else {
            run++;
        }
    }
    buf_put(b, s.p + s.n - run, run, oom);
    put_cstr(b, "\"", oom);
}

typedef struct {
    sv key;
    anyval val;
    size_t idx;
} jkv;

static int jkv_cmp(const void *a, const void *b) {
    const jkv *x = *(const jkv *const *)a, *y = *(const jkv *const *)b;
    size_t n = x->key.n < y->key.n ? x->key.n : y->key.n;
    int c = n ? memcmp(x->key.p, y->key.p, n) : 0;
    if (c)
        return c;
    if (x->key.n != y->key.n)
        return x->key.n < y->key.n ? -1 : 1;
    return x->idx < y->idx ? -1 : (x->idx > y->idx ? 1 : 0);
}

static void put_json_av(buf_t *b, anyval *a, int *oom, int depth);

static void put_json_array(buf_t *b, anyval *a, int *oom, int depth) {
    put_cstr(b, "[", oom);
    int first = 1;
    for (size_t i = 0; i < a->sub.n; i++) {
        sv seg = seg_at(&a->sub, i);
        const uint8_t *p = seg.p, *e = seg.p + seg.n;
        field_t f;
        while (next_field(&p, e, &f)) {
            if (f.tag != TAG(1, 2))
                continue;
            if (!first)
                put_cstr(b, ",", oom);
            first = 0;
            anyval x = {0};
            seg_init(&x.sub);
            av_feed(&x, f.ld, oom);
            put_json_av(b, &x, oom, depth + 1);
            seg_free(&x.sub);
        }
    }
    put_cstr(b, "]", oom);
}

static void put_json_kvlist(buf_t *b, anyval *a, int *oom, int depth) {
    size_t n = 0, cap = 0;
    jkv *items = NULL;
    for (size_t i = 0; i < a->sub.n && !*oom; i++) {
        sv seg = seg_at(&a->sub, i);
        const uint8_t *p = seg.p, *e = seg.p + seg.n;
        field_t f;
        while (next_field(&p, e, &f)) {
            if (f.tag != TAG(1, 2))
                continue;
            if (n == cap) {
                size_t nc = cap ? cap * 2 : 8;
                jkv *ni = realloc(items, nc * sizeof(jkv));
                if (!ni) {
                    *oom = 1;
                    break;
                }
                items = ni;
                cap = nc;
            }
            jkv *it = &items[n];
            memset(it, 0, sizeof *it);
            seg_init(&it->val.sub);
            it->idx = n;
            n++;
            kv_parse(f.ld, &it->key, &it->val, oom);
        }
    }
    jkv **order = n ? malloc(n * sizeof(jkv *)) : NULL;
    if (n && !order)
        *oom = 1;
    if (!*oom) {
        for (size_t i = 0; i < n; i++)
            order[i] = &items[i];
        qsort(order, n, sizeof(jkv *), jkv_cmp);
        put_cstr(b, "{", oom);
        int first = 1;
        for (size_t i = 0; i < n; i++) {
            /* a dict: the last value of a repeated key */
            if (i + 1 < n && order[i + 1]->key.n == order[i]->key.n &&
                (order[i]->key.n == 0 || !memcmp(order[i + 1]->key.p, order[i]->key.p, order[i]->key.n)))
                continue;
            if (!first)
                put_cstr(b, ",", oom);
            first = 0;
            put_json_str(b, order[i]->key, oom);
            put_cstr(b, ":", oom);
            put_json_av(b, &order[i]->val, oom, depth + 1);
        }
        put_cstr(b, "}", oom);
    }
    for (size_t i = 0; i < n; i++)
        seg_free(&items[i].val.sub);
    free(items);
    free(order);
}

static void put_json_av(buf_t *b, anyval *a, int *oom, int depth) {
    double d;
    if (depth > MAX_DEPTH) { /* only on bytes that were not validated (they nest at most 100 deep) */
        put_cstr(b, "null", oom);
        return;
    }
    switch (a->which) {
    case AV_STR: put_json_str(b, a->s, oom); break;
    case AV_BOOL: put_cstr(b, a->u ? "true" : "false", oom); break;
    case AV_INT: put_i64(b, (int64_t)a->u, oom); break;
    case AV_DOUBLE:
        memcpy(&d, &a->u, 8);
        put_json_double(b, d, oom);
        break;
    case AV_BYTES:
        put_cstr(b, "\"", oom);
        put_base64(b, a->s, oom);
        put_cstr(b, "\"", oom);
        break;
    case AV_ARR: put_json_array(b, a, oom, depth); break;
    case AV_KVL: put_json_kvlist(b, a, oom, depth); break;
    default: put_cstr(b, "null", oom); break;
    }
}

/* value_str into *out (raw bytes, no length prefix) */
static void put_value_str(buf_t *b, anyval *a, int *oom) {
    double d;
    switch (a->which) {
    case AV_NONE: break;
    case AV_STR: buf_put(b, a->s.p, a->s.n, oom); break;
    case AV_BOOL: put_cstr(b, a->u ? "true" : "false", oom); break;
    case AV_INT: put_i64(b, (int64_t)a->u, oom); break;
    case AV_DOUBLE:
        memcpy(&d, &a->u, 8);
        put_go_double(b, d, oom);
        break;
    case AV_BYTES: put_base64(b, a->s, oom); break;
    default: put_json_av(b, a, oom, 0); break; /* arrays, maps; string_value_strindex is null */
    }
}

/* ------------------------------------------------------------------------------------------ */
/* LowCardinality(String) columns: each distinct value once, and an index per row              */

/* The exporter's tables hold span names, kinds, service names, status codes, event names and every
 * attribute map's keys as LowCardinality(String). Handed over as String, ClickHouse hashed every
 * value into a dictionary again (20 keys a span for benchmarks/collector.py's spans): measured in
 * chdb on 100k of those spans, the insert cost 3.8-4.9 us a row as String, 2.5-3.6 as
 * LowCardinality, and the block is half the size. So the block carries them as ClickHouse's Native
 * format does (SerializationLowCardinality): a key version (UInt64 1) before the column's data; then,
 * where the column holds any value, flags (UInt64: index width, HasAdditionalKeys, and
 * NeedUpdateDictionary, as ClickHouse writes them), the distinct values as a String column with its
 * UInt64 count, the UInt64 count of rows and one index per row, UInt8 to UInt32 wide as the count of
 * values needs. The dictionary is the batch's: a hash table over the values, with the index found
 * last at the same place (a span's n-th attribute, say) tried first, as batches repeat themselves. */

typedef struct {
    uint64_t h;
    size_t off; /* the value's bytes in keys */
    size_t n;
} lckey;

#define LC_HINTS 64

typedef struct {
    buf_t keys; /* the distinct values, as a String column */
    lckey *k;
    size_t nk, kcap;
    uint32_t *slot; /* open addressing: a value's number + 1; 0 is empty. Never more than half full */
    size_t scap;
    uint32_t hint[LC_HINTS];
} lcdict;

/* a per-process random seed: values chosen to collide cannot be worked out in advance */
static uint64_t lc_seed;

static inline uint64_t lc_mix(uint64_t a, uint64_t b) {
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

static uint64_t lc_hash(const uint8_t *p, size_t n) {
    uint64_t h = lc_seed ^ ((uint64_t)n * 0x9E3779B97F4A7C15ULL);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = lc_mix(h ^ w, 0xbf58476d1ce4e5b9ULL);
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t w = 0;
        memcpy(&w, p, n);
        h = lc_mix(h ^ w, 0x94d049bb133111ebULL);
    }
    return lc_mix(h, 0xff51afd7ed558ccdULL);
}

static void lc_reset(lcdict *d) {
    if (d->nk && d->slot)
        memset(d->slot, 0, d->scap * sizeof(uint32_t));
    d->keys.n = 0;
    d->nk = 0;
    memset(d->hint, 0xff, sizeof d->hint);
}

static void lc_free(lcdict *d) {
    buf_free(&d->keys);
    free(d->k);
    free(d->slot);
    memset(d, 0, sizeof *d);
}

static __attribute__((noinline)) int lc_grow(lcdict *d, int *oom) {
    size_t nc = d->scap ? d->scap * 2 : 64;
    uint32_t *ns = nc > SIZE_MAX / sizeof(uint32_t) ? NULL : calloc(nc, sizeof(uint32_t));
    if (!ns) {
        *oom = 1;
        return 0;
    }
    for (size_t i = 0; i < d->nk; i++) {
        size_t j = (size_t)d->k[i].h & (nc - 1);
        while (ns[j])
            j = (j + 1) & (nc - 1);
        ns[j] = (uint32_t)(i + 1);
    }
    free(d->slot);
    d->slot = ns;
    d->scap = nc;
    return 1;
}

/* a == b over n bytes; up to 32 without a call to memcmp (most values here are short keys) */
static inline __attribute__((always_inline)) int same_bytes(const uint8_t *a, const uint8_t *b, size_t n) {
    uint64_t x, y, u, v;
    if (n >= 8 && n <= 32) {
        memcpy(&x, a, 8), memcpy(&y, b, 8), memcpy(&u, a + n - 8, 8), memcpy(&v, b + n - 8, 8);
        if ((x ^ y) | (u ^ v))
            return 0;
        if (n <= 16)
            return 1;
        memcpy(&x, a + 8, 8), memcpy(&y, b + 8, 8), memcpy(&u, a + n - 16, 8), memcpy(&v, b + n - 16, 8);
        return !((x ^ y) | (u ^ v));
    }
    if (n < 8) {
        for (size_t i = 0; i < n; i++)
            if (a[i] != b[i])
                return 0;
        return 1;
    }
    return !memcmp(a, b, n);
}

/* the index of value p[0:n] in the dictionary, added when new; `at` names the place it was found
 * (LC_HINTS or more: none) */
static inline __attribute__((always_inline)) uint32_t lc_index(lcdict *d, const uint8_t *p, size_t n, size_t at,
                                                             int *oom) {
    if (at < LC_HINTS) {
        uint32_t t = d->hint[at];
        if (t < d->nk && d->k[t].n == n && same_bytes(d->keys.p + d->k[t].off, p, n))
            return t;
    }
    if (*oom || (2 * (d->nk + 1) > d->scap && !lc_grow(d, oom)))
        return 0;
    uint64_t h = lc_hash(p, n);
    size_t j = (size_t)h & (d->scap - 1);
    uint32_t s;
    while ((s = d->slot[j])) {
        const lckey *e = &d->k[s - 1];
        if (e->h == h && e->n == n && same_bytes(d->keys.p + e->off, p, n))
            goto found;
        j = (j + 1) & (d->scap - 1);
    }
    if (d->nk >= 0xfffffffeu) {
        *oom = 1;
        return 0;
    }
    if (d->nk == d->kcap) {
        lckey *nk = grow_array(d->k, &d->kcap, sizeof(lckey), 64, oom);
        if (!nk)
            return 0;
        d->k = nk;
    }
    buf_varint(&d->keys, n, oom);
    if (*oom)
        return 0;
    d->k[d->nk].h = h;
    d->k[d->nk].off = d->keys.n;
    d->k[d->nk].n = n;
    buf_put(&d->keys, p, n, oom);
    s = (uint32_t)(++d->nk);
    d->slot[j] = s;
found:
    if (at < LC_HINTS)
        d->hint[at] = s - 1;
    return s - 1;
}

/* one row's value of a LowCardinality column: its index, 4 bytes (narrowed when the block is written) */
static inline __attribute__((always_inline)) void lc_put(lcdict *d, buf_t *idx, const uint8_t *p, size_t n, size_t at,
                                                       int *oom) {
    buf_u32(idx, lc_index(d, p, n, at, oom), oom);
}

/* ------------------------------------------------------------------------------------------ */
/* maps with dict semantics: a repeated key keeps its first place and takes its last value      */

typedef struct {
    sv key;
    const uint8_t *vp; /* value in the payload, or NULL: in scratch at voff */
    size_t voff, vn;
    uint64_t sig;
    int drop;
} ent_t;

typedef struct {
    ent_t *e;
    size_t n, cap;
    buf_t scratch;
    uint32_t *table;
    size_t tcap;
} mapbuild;

/* a cheap signature (length, first and last 8 bytes) for the pairwise check of small maps */
static uint64_t key_sig(sv k) {
    uint64_t a = 0, b = 0;
    if (k.n >= 8) { /* two plain loads (a variable-length copy would go through the stack) */
        memcpy(&a, k.p, 8);
        memcpy(&b, k.p + k.n - 8, 8);
    } else if (k.n) {
        memcpy(&a, k.p, k.n);
        memcpy(&b, k.p, k.n);
    }
    return ((a ^ (b * 0x9E3779B97F4A7C15ULL)) + k.n) * 0xff51afd7ed558ccdULL;
}

/* a hash of the whole key for the table of large maps (hostile keys cannot make it quadratic) */
static uint64_t key_hash(sv k) {
    uint64_t h = 1469598103934665603ULL ^ k.n;
    for (size_t i = 0; i < k.n; i++) {
        h ^= k.p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static inline int key_eq(const ent_t *a, const ent_t *b) {
    return a->sig == b->sig && a->key.n == b->key.n && (a->key.n == 0 || !memcmp(a->key.p, b->key.p, a->key.n));
}

/* kv_parse for the common shape (kv_frame), its value holding nothing, one string or one int; 0
 * for anything else (kv_parse then reads it). Same key and value as kv_parse gives for these bytes. */
static inline __attribute__((always_inline)) int kv_common(sv kv, sv *key, anyval *a) {
    sv k, val;
    if (!kv_frame(kv.p, kv.n, &k, &val))
        return 0;
    const uint8_t *av = val.p;
    size_t an = val.n;
    if (!an) {
        a->which = AV_NONE;
    } else if (av[0] == 0x0A && an >= 2 && av[1] < 0x80 && (size_t)av[1] == an - 2) {
        a->which = AV_STR;
        a->s.p = av + 2;
        a->s.n = an - 2;
    } else if (av[0] == 0x18 && an >= 2 && an <= 11) {
        const uint8_t *q = av + 1;
        a->u = uv(&q, av + an);
        if (q != av + an)
            return 0;
        a->which = AV_INT;
    } else {
        return 0;
    }
    *key = k;
    return 1;
}

/* one KeyValue occurrence, rendered, appended to the map (deduplicated by map_dedup) */
static void map_add(mapbuild *m, sv kv, int *oom) {
    if (m->n == m->cap) {
        ent_t *ne = grow_array(m->e, &m->cap, sizeof(ent_t), 32, oom);
        if (!ne)
            return;
        m->e = ne;
    }
    ent_t *en = &m->e[m->n++];
    anyval a = {0};
    seg_init(&a.sub);
    if (!kv_common(kv, &en->key, &a))
        kv_parse(kv, &en->key, &a, oom);
    en->drop = 0;
    if (a.which == AV_STR) {
        en->vp = a.s.p;
        en->vn = a.s.n;
    } else {
        en->vp = NULL;
        en->voff = m->scratch.n;
        put_value_str(&m->scratch, &a, oom);
        en->vn = m->scratch.n - en->voff;
    }
    seg_free(&a.sub);
    en->sig = key_sig(en->key);
}

static inline void map_take(mapbuild *m, size_t into, size_t from) {
    m->e[into].vp = m->e[from].vp;
    m->e[into].voff = m->e[from].voff;
    m->e[into].vn = m->e[from].vn;
    m->e[from].drop = 1;
}

/* dict semantics over what map_add appended: a repeated key keeps its first place, takes its last value */
static void map_dedup(mapbuild *m, int *oom) {
    size_t n = m->n;
    if (n < 2 || *oom)
        return;
    if (n <= 24) {
        /* an entry whose signature's top 6 bits no earlier entry had cannot repeat a key: only the
         * others are compared pairwise */
        uint64_t seen = 0;
        for (size_t i = 0; i < n; i++) {
            uint64_t bit = 1ULL << (m->e[i].sig >> 58);
            if (seen & bit) {
                for (size_t j = 0; j < i; j++)
                    if (!m->e[j].drop && key_eq(&m->e[i], &m->e[j])) {
                        map_take(m, j, i);
                        break;
                    }
            }
            seen |= bit;
        }
        return;
    }
    size_t tcap = 64;
    while (tcap < 2 * n)
        tcap *= 2;
    if (tcap > m->tcap) {
        uint32_t *t = realloc(m->table, tcap * sizeof(uint32_t));
        if (!t) {
            *oom = 1;
            return;
        }
        m->table = t;
        m->tcap = tcap;
    }
    if (n >= 0xffffffffu) {
        *oom = 1;
        return;
    }
    memset(m->table, 0xff, tcap * sizeof(uint32_t));
    for (size_t i = 0; i < n; i++)
        m->e[i].sig = key_hash(m->e[i].key);
    for (size_t i = 0; i < n; i++) {
        size_t h = (size_t)((m->e[i].sig ^ (m->e[i].sig >> 29)) & (tcap - 1));
        for (;;) {
            uint32_t j = m->table[h];
            if (j == 0xffffffffu) {
                m->table[h] = (uint32_t)i;
                break;
            }
            if (key_eq(&m->e[i], &m->e[j])) {
                map_take(m, j, i);
                break;
            }
            h = (h + 1) & (tcap - 1);
        }
    }
}

static inline void map_reset(mapbuild *m) {
    m->n = 0;
    m->scratch.n = 0;
}

/* the KeyValue occurrences with tag `tag` in the segments of a message, rendered and deduplicated */
static void map_build(mapbuild *m, const sv *segs, size_t nsegs, uint32_t tag, int *oom) {
    map_reset(m);
    for (size_t s = 0; s < nsegs && !*oom; s++) {
        const uint8_t *p = segs[s].p, *e = segs[s].p + segs[s].n;
        field_t f;
        while (next_field(&p, e, &f) && !*oom)
            if (f.tag == tag)
                map_add(m, f.ld, oom);
    }
    map_dedup(m, oom);
}

static inline sv ent_val(const mapbuild *m, const ent_t *e) {
    sv v;
    v.p = e->vp ? e->vp : m->scratch.p + e->voff;
    v.n = e->vn;
    return v;
}

/* append the map's keys (indexes into a LowCardinality dictionary) and values (a String column); return
 * the entries written */
static size_t map_write_lc(const mapbuild *m, lcdict *d, buf_t *keys, buf_t *vals, int *oom) {
    size_t w = 0;
    for (size_t i = 0; i < m->n; i++) {
        const ent_t *e = &m->e[i];
        if (e->drop)
            continue;
        lc_put(d, keys, e->key.p, e->key.n, w, oom);
        sv v = ent_val(m, e);
        buf_str(vals, v.p, v.n, oom);
        w++;
    }
    return w;
}

static void map_free(mapbuild *m) {
    free(m->e);
    free(m->table);
    buf_free(&m->scratch);
    memset(m, 0, sizeof *m);
}

/* ------------------------------------------------------------------------------------------ */
/* spans                                                                                      */

/* a growable array of segments, kept and reused from span to span */
typedef struct {
    sv *p;
    size_t n, cap;
} svbuf;

static int svbuf_grow(svbuf *b, int *oom) {
    sv *np = grow_array(b->p, &b->cap, sizeof(sv), 32, oom);
    if (!np)
        return 0;
    b->p = np;
    return 1;
}

static inline void svbuf_push(svbuf *b, sv x, int *oom) {
    if (b->n == b->cap && !svbuf_grow(b, oom))
        return;
    b->p[b->n++] = x;
}

typedef struct {
    sv tid, sid, psid, tstate, name;
    int32_t kind;
    uint64_t start, end;
    sv smsg; /* status, merged over its occurrences: last wins */
    int32_t code;
    svbuf attrs, events, links; /* KeyValue, Event and Link occurrences, in order */
} span_t;

/* one pass over a span's fields: everything check and encode need from it */
static void span_parse(sv seg, span_t *s, int *oom) {
    static const uint8_t empty[1] = {0};
    s->tid.p = s->sid.p = s->psid.p = s->tstate.p = s->name.p = s->smsg.p = empty;
    s->tid.n = s->sid.n = s->psid.n = s->tstate.n = s->name.n = s->smsg.n = 0;
    s->kind = s->code = 0;
    s->start = s->end = 0;
    s->attrs.n = s->events.n = s->links.n = 0;
    const uint8_t *p = seg.p, *e = seg.p + seg.n;
    field_t f;
    while (next_field(&p, e, &f)) {
        switch (f.tag) {
        case TAG(1, 2): s->tid = f.ld; break;
        case TAG(2, 2): s->sid = f.ld; break;
        case TAG(3, 2): s->tstate = f.ld; break;
        case TAG(4, 2): s->psid = f.ld; break;
        case TAG(5, 2): s->name = f.ld; break;
        case TAG(6, 0): s->kind = (int32_t)(uint32_t)f.u; break;
        case TAG(7, 1): s->start = f.u; break;
        case TAG(8, 1): s->end = f.u; break;
        case TAG(9, 2): svbuf_push(&s->attrs, f.ld, oom); break;
        case TAG(11, 2): svbuf_push(&s->events, f.ld, oom); break;
        case TAG(13, 2): svbuf_push(&s->links, f.ld, oom); break;
        case TAG(15, 2): {
            const uint8_t *q = f.ld.p, *qe = f.ld.p + f.ld.n;
            field_t g;
            while (next_field(&q, qe, &g)) {
                if (g.tag == TAG(2, 2)) s->smsg = g.ld;
                else if (g.tag == TAG(3, 0)) s->code = (int32_t)(uint32_t)g.u;
            }
            break;
        }
        }
    }
}

static void span_free(span_t *s) {
    free(s->attrs.p);
    free(s->events.p);
    free(s->links.p);
    memset(&s->attrs, 0, sizeof s->attrs);
    memset(&s->events, 0, sizeof s->events);
    memset(&s->links, 0, sizeof s->links);
}

/* trace_id and span_id of a link, last wins */
static void link_ids(sv seg, sv *tid, sv *sid, sv *tstate) {
    static const uint8_t empty[1] = {0};
    tid->p = sid->p = tstate->p = empty;
    tid->n = sid->n = tstate->n = 0;
    const uint8_t *p = seg.p, *e = seg.p + seg.n;
    field_t f;
    while (next_field(&p, e, &f)) {
        if (f.tag == TAG(1, 2)) *tid = f.ld;
        else if (f.tag == TAG(2, 2)) *sid = f.ld;
        else if (f.tag == TAG(3, 2)) *tstate = f.ld;
    }
}

static void event_fields(sv seg, uint64_t *t, sv *name) {
    static const uint8_t empty[1] = {0};
    *t = 0;
    name->p = empty;
    name->n = 0;
    const uint8_t *p = seg.p, *e = seg.p + seg.n;
    field_t f;
    while (next_field(&p, e, &f)) {
        if (f.tag == TAG(1, 1)) *t = f.u;
        else if (f.tag == TAG(2, 2)) *name = f.ld;
    }
}

/* _span_problem: 0 or the kind of refusal (1..5) and the number it quotes */
typedef struct {
    int kind;
    size_t num;
    sv name;
} problem_t;

static int span_problem(const span_t *s, problem_t *pr) {
    pr->name = s->name;
    pr->num = 0;
    if (s->tid.n != 16 || all_zero(s->tid)) {
        pr->num = s->tid.n;
        return pr->kind = 1;
    }
    if (s->sid.n != 8 || all_zero(s->sid)) {
        pr->num = s->sid.n;
        return pr->kind = 2;
    }
    if (s->psid.n && s->psid.n != 8) {
        pr->num = s->psid.n;
        return pr->kind = 3;
    }
    for (size_t k = 0; k < s->links.n; k++) {
        sv t, i, ts;
        link_ids(s->links.p[k], &t, &i, &ts);
        if (t.n != 16 || i.n != 8)
            return pr->kind = 4;
    }
    if (s->start > MAX_TIME_NS || s->end > MAX_TIME_NS)
        return pr->kind = 5;
    for (size_t k = 0; k < s->events.n; k++) {
        uint64_t t;
        sv nm;
        event_fields(s->events.p[k], &t, &nm);
        if (t > MAX_TIME_NS)
            return pr->kind = 5;
    }
    return pr->kind = 0;
}


/* ------------------------------------------------------------------------------------------ */
/* the walk over a request, shared by check and encode                                        */

enum {
    B_TS, B_TID, B_SID, B_PSID, B_TSTATE, B_NAME, B_KIND, B_SVC, B_RA_OFF, B_RA_K, B_RA_V, B_SCN, B_SCV,
    B_SA_OFF, B_SA_K, B_SA_V, B_DUR, B_SCODE, B_SMSG, B_EV_OFF, B_EV_TS, B_EV_NAME, B_EA_IN, B_EA_K, B_EA_V,
    B_LK_OFF, B_LK_TID, B_LK_SID, B_LK_TS, B_LA_IN, B_LA_K, B_LA_V, B_COUNT
};

typedef struct {
    int oom;
    int encode; /* 0: check only */
    /* check */
    size_t valid, rejected;
    problem_t reasons[MAX_REASONS];
    int nreasons;
    /* encode */
    buf_t b[B_COUNT];
    size_t rows, n_ra, n_sa, n_ev, n_ea, n_lk, n_la;
    mapbuild mres, mspan;
    span_t span; /* the span being walked; its arrays are reused */
    buf_t res_k, res_v, svc; /* the resource's map (keys as indexes) and service name, once per ResourceSpans */
    size_t res_count;
    uint32_t svc_idx;
    lcdict lc[B_COUNT]; /* the dictionaries of the buffers that are LowCardinality (IS_LC) */
} walk_t;

/* the buffers holding a LowCardinality column's indexes */
static const uint8_t IS_LC[B_COUNT] = {[B_NAME] = 1, [B_KIND] = 1, [B_SVC] = 1, [B_RA_K] = 1, [B_SA_K] = 1,
                                       [B_SCODE] = 1, [B_EV_NAME] = 1, [B_EA_K] = 1, [B_LA_K] = 1};

static int problem_eq(const problem_t *a, const problem_t *b) {
    return a->kind == b->kind && a->num == b->num && a->name.n == b->name.n &&
           (a->name.n == 0 || !memcmp(a->name.p, b->name.p, a->name.n));
}

static const char *const KINDS[] = {"Unspecified", "Internal", "Server", "Client", "Producer", "Consumer"};
static const char *const STATUS[] = {"Unset", "Ok", "Error"};

static void put_strcol(buf_t *b, sv s, int *oom) { buf_str(b, s.p, s.n, oom); }


static void emit_span(walk_t *w, const span_t *s, sv scope_name, sv scope_version) {
    int *oom = &w->oom;
    buf_t *b = w->b;
    buf_u64(&b[B_TS], s->start, oom);
    put_hex(&b[B_TID], s->tid, oom);
    put_hex(&b[B_SID], s->sid, oom);
    if (all_zero(s->psid))
        buf_varint(&b[B_PSID], 0, oom);
    else
        put_hex(&b[B_PSID], s->psid, oom);
    put_strcol(&b[B_TSTATE], s->tstate, oom);
    lc_put(&w->lc[B_NAME], &b[B_NAME], s->name.p, s->name.n, 0, oom);
    int kind = s->kind >= 0 && s->kind < 6 ? s->kind : 0;
    lc_put(&w->lc[B_KIND], &b[B_KIND], (const uint8_t *)KINDS[kind], strlen(KINDS[kind]), 0, oom);
    buf_u32(&b[B_SVC], w->svc_idx, oom);
    /* the resource's map, rendered once per ResourceSpans */
    buf_put(&b[B_RA_K], w->res_k.p, w->res_k.n, oom);
    buf_put(&b[B_RA_V], w->res_v.p, w->res_v.n, oom);
    w->n_ra += w->res_count;
    buf_u64(&b[B_RA_OFF], w->n_ra, oom);
    put_strcol(&b[B_SCN], scope_name, oom);
    put_strcol(&b[B_SCV], scope_version, oom);
    map_reset(&w->mspan);
    for (size_t k = 0; k < s->attrs.n && !*oom; k++)
        map_add(&w->mspan, s->attrs.p[k], oom);
    map_dedup(&w->mspan, oom);
    w->n_sa += map_write_lc(&w->mspan, &w->lc[B_SA_K], &b[B_SA_K], &b[B_SA_V], oom);
    buf_u64(&b[B_SA_OFF], w->n_sa, oom);
    buf_u64(&b[B_DUR], s->end > s->start ? s->end - s->start : 0, oom);
    for (size_t k = 0; k < s->events.n; k++) {
        sv ev = s->events.p[k], nm;
        uint64_t t;
        event_fields(ev, &t, &nm);
        buf_u64(&b[B_EV_TS], t, oom);
        lc_put(&w->lc[B_EV_NAME], &b[B_EV_NAME], nm.p, nm.n, 0, oom);
        map_build(&w->mspan, &ev, 1, TAG(3, 2), oom);
        w->n_ea += map_write_lc(&w->mspan, &w->lc[B_EA_K], &b[B_EA_K], &b[B_EA_V], oom);
        buf_u64(&b[B_EA_IN], w->n_ea, oom);
        w->n_ev++;
    }
    for (size_t k = 0; k < s->links.n; k++) {
        sv lk = s->links.p[k], t, i, ts;
        link_ids(lk, &t, &i, &ts);
        if (all_zero(t)) buf_varint(&b[B_LK_TID], 0, oom);
        else put_hex(&b[B_LK_TID], t, oom);
        if (all_zero(i)) buf_varint(&b[B_LK_SID], 0, oom);
        else put_hex(&b[B_LK_SID], i, oom);
        put_strcol(&b[B_LK_TS], ts, oom);
        map_build(&w->mspan, &lk, 1, TAG(4, 2), oom);
        w->n_la += map_write_lc(&w->mspan, &w->lc[B_LA_K], &b[B_LA_K], &b[B_LA_V], oom);
        buf_u64(&b[B_LA_IN], w->n_la, oom);
        w->n_lk++;
    }
    int32_t code = s->code;
    code = code >= 0 && code < 3 ? code : 0;
    lc_put(&w->lc[B_SCODE], &b[B_SCODE], (const uint8_t *)STATUS[code], strlen(STATUS[code]), 0, oom);
    put_strcol(&b[B_SMSG], s->smsg, oom);
    buf_u64(&b[B_EV_OFF], w->n_ev, oom);
    buf_u64(&b[B_LK_OFF], w->n_lk, oom);
    w->rows++;
}

static void walk_scope_spans(walk_t *w, sv ss) {
    static const uint8_t empty[1] = {0};
    sv scope_name = {empty, 0}, scope_version = {empty, 0};
    const uint8_t *p = ss.p, *e = ss.p + ss.n;
    field_t f;
    if (w->encode) {
        while (next_field(&p, e, &f)) {
            if (f.tag != TAG(1, 2))
                continue;
            const uint8_t *q = f.ld.p, *qe = f.ld.p + f.ld.n;
            field_t g;
            while (next_field(&q, qe, &g)) {
                if (g.tag == TAG(1, 2)) scope_name = g.ld;
                else if (g.tag == TAG(2, 2)) scope_version = g.ld;
            }
        }
        p = ss.p;
    }
    while (next_field(&p, e, &f)) {
        if (f.tag != TAG(2, 2))
            continue;
        span_t *s = &w->span;
        problem_t pr;
        span_parse(f.ld, s, &w->oom);
        if (w->oom)
            return;
        if (span_problem(s, &pr)) {
            w->rejected++;
            int seen = 0;
            for (int i = 0; i < w->nreasons; i++)
                seen |= problem_eq(&w->reasons[i], &pr);
            if (!seen && w->nreasons < MAX_REASONS)
                w->reasons[w->nreasons++] = pr;
            continue;
        }
        w->valid++;
        if (w->encode)
            emit_span(w, s, scope_name, scope_version);
        if (w->oom)
            return;
    }
}

static const char SERVICE_NAME[] = "service.name";

static void walk_resource_spans(walk_t *w, sv rs) {
    const uint8_t *p = rs.p, *e = rs.p + rs.n;
    field_t f;
    if (w->encode) {
        segvec res;
        seg_init(&res);
        while (next_field(&p, e, &f))
            if (f.tag == TAG(1, 2))
                seg_push(&res, f.ld, &w->oom);
        sv *segs = res.heap ? res.heap : res.inl;
        map_build(&w->mres, segs, res.n, TAG(1, 2), &w->oom);
        seg_free(&res);
        w->res_k.n = w->res_v.n = w->svc.n = 0;
        w->res_count = map_write_lc(&w->mres, &w->lc[B_RA_K], &w->res_k, &w->res_v, &w->oom);
        for (size_t i = 0; i < w->mres.n; i++) {
            const ent_t *en = &w->mres.e[i];
            if (!en->drop && en->key.n == sizeof SERVICE_NAME - 1 && !memcmp(en->key.p, SERVICE_NAME, en->key.n)) {
                sv v = ent_val(&w->mres, en);
                buf_put(&w->svc, v.p, v.n, &w->oom);
            }
        }
        w->svc_idx = lc_index(&w->lc[B_SVC], w->svc.p, w->svc.n, 0, &w->oom);
        p = rs.p;
    }
    while (next_field(&p, e, &f)) {
        if (f.tag == TAG(2, 2))
            walk_scope_spans(w, f.ld);
        if (w->oom)
            return;
    }
}

/* validate (unless `checked`: it passed check() already) then walk one request; -1 with vc->err
 * set when it does not parse */
static int walk_request(walk_t *w, const uint8_t *data, size_t n, vctx *vc, int checked) {
    vc->base = data;
    vc->err = NULL;
    const uint8_t *p = data;
    if (!checked && validate(vc, M_REQ, &p, data + n, 0, 0))
        return -1;
    const uint8_t *e = data + n;
    field_t f;
    p = data;
    while (next_field(&p, e, &f)) {
        if (f.tag == TAG(1, 2))
            walk_resource_spans(w, f.ld);
        if (w->oom)
            return 0;
    }
    return 0;
}

static void walk_free(walk_t *w) {
    for (int i = 0; i < B_COUNT; i++)
        buf_free(&w->b[i]);
    map_free(&w->mres);
    map_free(&w->mspan);
    buf_free(&w->res_k);
    buf_free(&w->res_v);
    buf_free(&w->svc);
    for (int i = 0; i < B_COUNT; i++)
        lc_free(&w->lc[i]);
    span_free(&w->span);
}

/* writing into a block of known size: never past its end */
static uint8_t *raw_put(uint8_t *o, uint8_t *oe, const void *src, size_t n, int *bad) {
    if (*bad || n > (size_t)(oe - o)) {
        *bad = 1;
        return o;
    }
    if (n)
        memcpy(o, src, n);
    return o + n;
}

static uint8_t *raw_varint(uint8_t *o, uint8_t *oe, uint64_t v, int *bad) {
    uint8_t tmp[10];
    size_t n = 0;
    while (v >= 0x80) {
        tmp[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    tmp[n++] = (uint8_t)v;
    return raw_put(o, oe, tmp, n, bad);
}

static uint8_t *raw_u64(uint8_t *o, uint8_t *oe, uint64_t v, int *bad) {
    uint8_t le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (uint8_t)(v >> (8 * i));
    return raw_put(o, oe, le, 8, bad);
}

/* a LowCardinality column's data after its key version (see lcdict): nothing when it holds no value */
static uint8_t *raw_lc(uint8_t *o, uint8_t *oe, const lcdict *d, const buf_t *idx, int *bad) {
    size_t rows = idx->n / 4;
    if (!rows)
        return o;
    int width = d->nk <= 0x100 ? 1 : d->nk <= 0x10000 ? 2 : 4;
    o = raw_u64(o, oe, (uint64_t)(width / 2) | (1u << 9) | (1u << 10), bad); /* UInt8, UInt16, UInt32: 0, 1, 2 */
    o = raw_u64(o, oe, d->nk, bad);
    o = raw_put(o, oe, d->keys.p, d->keys.n, bad);
    o = raw_u64(o, oe, rows, bad);
    if (*bad || rows * (size_t)width > (size_t)(oe - o)) {
        *bad = 1;
        return o;
    }
    const uint8_t *in = idx->p;
    if (width == 4) {
        memcpy(o, in, rows * 4);
    } else {
        for (size_t r = 0; r < rows; r++) {
            uint32_t v;
            memcpy(&v, in + 4 * r, 4);
            if (width == 1) {
                o[r] = (uint8_t)v;
            } else {
                uint16_t h = (uint16_t)v;
                memcpy(o + 2 * r, &h, 2);
            }
        }
    }
    return o + rows * (size_t)width;
}

/* Encoding state kept between calls (only while the GIL is held is it taken or put back): its
 * column buffers keep their capacity, so the next batch neither grows them again nor faults in
 * fresh pages (measured: page faults were a tenth of the collector's CPU without it). */
static walk_t *spare;
#define SPARE_MAX_BYTES ((size_t)512 << 20)

static walk_t *walk_take(void) {
    walk_t *w = spare;
    spare = NULL;
    if (!w)
        w = calloc(1, sizeof(walk_t));
    if (!w)
        return NULL;
    for (int i = 0; i < B_COUNT; i++) {
        w->b[i].n = 0;
        lc_reset(&w->lc[i]);
    }
    w->res_k.n = w->res_v.n = w->svc.n = 0;
    w->oom = 0;
    w->valid = w->rejected = 0;
    w->nreasons = 0;
    w->rows = w->n_ra = w->n_sa = w->n_ev = w->n_ea = w->n_lk = w->n_la = 0;
    w->res_count = 0;
    return w;
}

static void walk_give_back(walk_t *w) {
    size_t held = 0;
    for (int i = 0; i < B_COUNT; i++)
        held += w->b[i].cap + w->lc[i].keys.cap + w->lc[i].scap * sizeof(uint32_t) + w->lc[i].kcap * sizeof(lckey);
    if (!spare && !w->oom && held <= SPARE_MAX_BYTES) {
        spare = w;
        return;
    }
    walk_free(w);
    free(w);
}

/* The last block handed out, kept to be written again: a block is ~1.2 KB a span (~100 MB for a
 * large batch), which glibc serves from a fresh mapping every time, so each batch paid a first-touch
 * page fault per 4 KiB of it (measured on benchmarks/collector.py's spans: 0.46 us a span of system
 * time encoding alone, 0.3 us a span of the collector's writer thread). It is
 * reused only once nobody else holds it (refcount 1: the caller dropped it after the insert), and
 * only while the blocks needed stay within a quarter of its size, so a burst's block does not stay
 * resident for ever once batches shrink. A block made to be kept has an eighth more room than asked:
 * batches of the same span count differ by a few per cent in bytes, and without it the next one a
 * little larger took a fresh block (measured in the collector's benchmark: ~24,000 page faults, a
 * whole 93 MB block, on the fourth insert). The room is never touched until a batch needs it, so it
 * costs address space, not memory. */
static PyObject *block_cache;
static size_t block_cache_cap;

/* A bytes object of *size* bytes to fill, the cached one when it is free and fits; a new reference. */
static PyObject *block_take(size_t size) {
    PyObject *b = block_cache;
    if (b && Py_REFCNT(b) == 1 && size <= block_cache_cap && size >= block_cache_cap / 4) {
        Py_SET_SIZE(b, (Py_ssize_t)size);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
        ((PyBytesObject *)b)->ob_shash = -1; /* its hash, cached in its last life, is stale */
#pragma GCC diagnostic pop
        PyBytes_AS_STRING(b)[size] = 0;
        Py_INCREF(b);
        return b;
    }
    int keep = !block_cache || Py_REFCNT(block_cache) == 1;
    size_t room = keep && size <= (size_t)PY_SSIZE_T_MAX - size / 8 - sizeof(PyBytesObject) ? size + size / 8 : size;
    b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)room);
    if (!b)
        return NULL;
    if (keep) {
        Py_XSETREF(block_cache, Py_NewRef(b));
        block_cache_cap = room;
    }
    Py_SET_SIZE(b, (Py_ssize_t)size);
    PyBytes_AS_STRING(b)[size] = 0;
    return b;
}

static PyObject *raise_decode(const vctx *vc) {
    PyErr_Format(DecodeError, "%s (at byte %zu)", vc->err, vc->errpos);
    return NULL;
}

static PyObject *reason_str(const problem_t *pr) {
    PyObject *name = PyUnicode_DecodeUTF8((const char *)pr->name.p, (Py_ssize_t)pr->name.n, "strict");
    if (!name)
        return NULL;
    PyObject *r = NULL;
    switch (pr->kind) {
    case 1: r = PyUnicode_FromFormat("span %R: trace_id must be 16 bytes, not all zero (got %zu bytes)", name, pr->num); break;
    case 2: r = PyUnicode_FromFormat("span %R: span_id must be 8 bytes, not all zero (got %zu bytes)", name, pr->num); break;
    case 3: r = PyUnicode_FromFormat("span %R: parent_span_id must be empty or 8 bytes (got %zu)", name, pr->num); break;
    case 4: r = PyUnicode_FromFormat("span %R: a link has a malformed trace_id or span_id", name); break;
    default: r = PyUnicode_FromFormat("span %R: a timestamp is past the year 2262 (more than 2**63-1 ns)", name); break;
    }
    Py_DECREF(name);
    return r;
}

/* ------------------------------------------------------------------------------------------ */
/* the module                                                                                 */

PyDoc_STRVAR(check_doc,
"check(payload: bytes) -> (valid_spans, rejected_spans, reasons)\n\n"
"The receiver's checks of an ExportTraceServiceRequest, on its bytes: the same counts and messages\n"
"as _encode._span_problem (at most 3 distinct reasons). Raises DecodeError where upb would.");

static PyObject *py_check(PyObject *self, PyObject *arg) {
    PyObject *bytes = PyBytes_Check(arg) ? (Py_INCREF(arg), arg) : PyBytes_FromObject(arg);
    if (!bytes)
        return NULL;
    walk_t w;
    memset(&w, 0, sizeof w);
    vctx vc;
    int rc;
    const uint8_t *data = (const uint8_t *)PyBytes_AS_STRING(bytes);
    size_t n = (size_t)PyBytes_GET_SIZE(bytes);
    Py_BEGIN_ALLOW_THREADS
    rc = walk_request(&w, data, n, &vc, 0);
    Py_END_ALLOW_THREADS
    PyObject *out = NULL;
    if (rc) {
        raise_decode(&vc);
    } else if (w.oom) {
        PyErr_NoMemory();
    } else {
        PyObject *reasons = PyList_New(0);
        for (int i = 0; reasons && i < w.nreasons; i++) {
            PyObject *s = reason_str(&w.reasons[i]);
            if (!s || PyList_Append(reasons, s)) {
                Py_XDECREF(s);
                Py_CLEAR(reasons);
                break;
            }
            Py_DECREF(s);
        }
        if (reasons)
            out = Py_BuildValue("nnN", (Py_ssize_t)w.valid, (Py_ssize_t)w.rejected, reasons);
    }
    walk_free(&w);
    Py_DECREF(bytes);
    return out;
}

static const char *const COL_NAMES[22] = {
    "Timestamp", "TraceId", "SpanId", "ParentSpanId", "TraceState", "SpanName", "SpanKind", "ServiceName",
    "ResourceAttributes", "ScopeName", "ScopeVersion", "SpanAttributes", "Duration", "StatusCode", "StatusMessage",
    "Events.Timestamp", "Events.Name", "Events.Attributes", "Links.TraceId", "Links.SpanId", "Links.TraceState",
    "Links.Attributes"};
#define LCS "LowCardinality(String)"
static const char *const COL_TYPES[22] = {
    "DateTime64(9)", "String", "String", "String", "String", LCS, LCS, LCS, "Map(" LCS ", String)",
    "String", "String", "Map(" LCS ", String)", "UInt64", LCS, "String", "Array(DateTime64(9))", "Array(" LCS ")",
    "Array(Map(" LCS ", String))", "Array(String)", "Array(String)", "Array(String)", "Array(Map(" LCS ", String))"};
#undef LCS
/* the buffers of each column, in order; -1 ends */
static const int COL_BUFS[22][5] = {
    {B_TS, -1}, {B_TID, -1}, {B_SID, -1}, {B_PSID, -1}, {B_TSTATE, -1}, {B_NAME, -1}, {B_KIND, -1}, {B_SVC, -1},
    {B_RA_OFF, B_RA_K, B_RA_V, -1}, {B_SCN, -1}, {B_SCV, -1}, {B_SA_OFF, B_SA_K, B_SA_V, -1}, {B_DUR, -1},
    {B_SCODE, -1}, {B_SMSG, -1}, {B_EV_OFF, B_EV_TS, -1}, {B_EV_OFF, B_EV_NAME, -1},
    {B_EV_OFF, B_EA_IN, B_EA_K, B_EA_V, -1}, {B_LK_OFF, B_LK_TID, -1}, {B_LK_OFF, B_LK_SID, -1},
    {B_LK_OFF, B_LK_TS, -1}, {B_LK_OFF, B_LA_IN, B_LA_K, B_LA_V, -1}};

PyDoc_STRVAR(encode_doc,
"encode(payloads, checked=False) -> (rows, block)\n\n"
"The valid spans of a batch of ExportTraceServiceRequest payloads (bytes or bytes-like) as one\n"
"ClickHouse Native block for otel_traces: exactly the rows _encode.encode_traces produces. Raises\n"
"DecodeError when a payload does not parse. checked=True: every payload passed check() already, so\n"
"it is not validated again (malformed bytes then give wrong rows, never a read out of bounds).");

static PyObject *py_encode(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"payloads", "checked", NULL};
    PyObject *arg;
    int checked = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|p:encode", kwlist, &arg, &checked))
        return NULL;
    /* a tuple of our own: it holds the payloads while the GIL is released, whatever other threads
     * do to the caller's list meanwhile */
    PyObject *seq = PySequence_Tuple(arg);
    if (!seq)
        return NULL;
    Py_ssize_t np = PyTuple_GET_SIZE(seq);
    PyObject **items = &PyTuple_GET_ITEM(seq, 0);
    sv *pl = PyMem_Malloc((size_t)(np ? np : 1) * sizeof(sv));
    /* bytes, or any contiguous buffer (the write-ahead log hands over views of its mapped pages);
     * held, so that none can be resized or released while the GIL is released */
    Py_buffer *views = PyMem_Calloc((size_t)(np ? np : 1), sizeof(Py_buffer));
    if (!pl || !views) {
        PyMem_Free(pl);
        PyMem_Free(views);
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    Py_ssize_t held = 0;
    for (; held < np; held++) {
        if (PyObject_GetBuffer(items[held], &views[held], PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "encode() takes a sequence of bytes (or bytes-like objects)");
            break;
        }
        pl[held].p = (const uint8_t *)views[held].buf;
        pl[held].n = (size_t)views[held].len;
    }
    walk_t *w = held == np ? walk_take() : NULL;
    if (!w) {
        if (held == np)
            PyErr_NoMemory();
        for (Py_ssize_t i = 0; i < held; i++)
            PyBuffer_Release(&views[i]);
        PyMem_Free(views);
        PyMem_Free(pl);
        Py_DECREF(seq);
        return NULL;
    }
    w->encode = 1;
    vctx vc;
    int rc = 0;
    size_t total = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < np && !rc && !w->oom; i++)
        rc = walk_request(w, pl[i].p, pl[i].n, &vc, checked);
    if (!rc && !w->oom && w->rows) {
        total = 20;
        for (int c = 0; c < 22; c++) {
            total += 2 + strlen(COL_NAMES[c]) + strlen(COL_TYPES[c]);
            for (int k = 0; COL_BUFS[c][k] >= 0; k++) {
                int bi = COL_BUFS[c][k];
                total += w->b[bi].n;
                if (IS_LC[bi]) /* the key version, flags, counts and the dictionary; indexes no wider than 4 */
                    total += 32 + w->lc[bi].keys.n;
            }
        }
    }
    Py_END_ALLOW_THREADS
    PyObject *out = NULL;
    if (rc) {
        raise_decode(&vc);
    } else if (w->oom) {
        PyErr_NoMemory();
    } else if (!w->rows) {
        out = Py_BuildValue("ny#", (Py_ssize_t)0, "", (Py_ssize_t)0);
    } else {
        PyObject *block = block_take(total);
        if (block) {
            uint8_t *o = (uint8_t *)PyBytes_AS_STRING(block), *o0 = o, *oe = o + total;
            int bad = 0;
            Py_BEGIN_ALLOW_THREADS
            o = raw_varint(o, oe, 22, &bad);
            o = raw_varint(o, oe, w->rows, &bad);
            for (int c = 0; c < 22; c++) {
                o = raw_varint(o, oe, strlen(COL_NAMES[c]), &bad);
                o = raw_put(o, oe, COL_NAMES[c], strlen(COL_NAMES[c]), &bad);
                o = raw_varint(o, oe, strlen(COL_TYPES[c]), &bad);
                o = raw_put(o, oe, COL_TYPES[c], strlen(COL_TYPES[c]), &bad);
                for (int k = 0; COL_BUFS[c][k] >= 0; k++)
                    if (IS_LC[COL_BUFS[c][k]]) /* the key version leads the column's data, before any offsets */
                        o = raw_u64(o, oe, 1, &bad);
                for (int k = 0; COL_BUFS[c][k] >= 0; k++) {
                    int bi = COL_BUFS[c][k];
                    if (IS_LC[bi])
                        o = raw_lc(o, oe, &w->lc[bi], &w->b[bi], &bad);
                    else
                        o = raw_put(o, oe, w->b[bi].p, w->b[bi].n, &bad);
                }
            }
            Py_END_ALLOW_THREADS
            if (bad) {
                Py_DECREF(block);
                PyErr_SetString(PyExc_SystemError, "_otlpc: block size miscounted");
            } else {
                Py_SET_SIZE(block, o - o0); /* never larger: total is an upper bound */
                PyBytes_AS_STRING(block)[o - o0] = 0;
                out = Py_BuildValue("nN", (Py_ssize_t)w->rows, block);
            }
        }
    }
    walk_give_back(w);
    for (Py_ssize_t i = 0; i < np; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(pl);
    Py_DECREF(seq);
    return out;
}

static PyMethodDef methods[] = {
    {"check", py_check, METH_O, check_doc},
    {"encode", (PyCFunction)(void (*)(void))py_encode, METH_VARARGS | METH_KEYWORDS, encode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "tracemesh.collector._otlpc",
    "OTLP trace requests checked and encoded as ClickHouse Native blocks, in C (see _otlpc.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__otlpc(void) {
    fill_fields();
    if (getrandom(&lc_seed, sizeof lc_seed, GRND_NONBLOCK) != (ssize_t)sizeof lc_seed)
        lc_seed = (uint64_t)(uintptr_t)&lc_seed ^ ((uint64_t)time(NULL) * 0x9E3779B97F4A7C15ULL);
    PyObject *m = PyModule_Create(&moddef);
    if (!m)
        return NULL;
    DecodeError = PyErr_NewExceptionWithDoc("tracemesh.collector._otlpc.DecodeError",
                                            "The bytes are not a well-formed ExportTraceServiceRequest.",
                                            PyExc_ValueError, NULL);
    if (!DecodeError || PyModule_AddObjectRef(m, "DecodeError", DecodeError) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "MAX_DEPTH", MAX_DEPTH);
    return m;
}
