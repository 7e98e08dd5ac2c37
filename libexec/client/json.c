/* The protocol's JSON, and only that: a writer that produces Python's json.dumps(..., ensure_ascii=True,
 * separators=(",", ":")) byte for byte (environment bytes that are not UTF-8 become \udcXX, Python's
 * surrogateescape), and a bounded reader for the daemon's replies. The reader never recurses deeper than
 * MAX_DEPTH and never reads outside the frame: a hostile or broken frame is "malformed", never a crash. */
#include "cbc.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 32

static void u_esc(struct buf *b, unsigned cp)
{
    char e[8];
    snprintf(e, sizeof e, "\\u%04x", cp & 0xffff);
    buf_add(b, e, 6);
}

/* Length of a valid UTF-8 sequence at s (Python's strict decoder), 0 if invalid there. */
static size_t utf8_len(const unsigned char *s, size_t n, unsigned *cp)
{
    unsigned c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    size_t len;
    unsigned lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) len = 2;
    else if (c >= 0xe0 && c <= 0xef) { len = 3; if (c == 0xe0) lo = 0xa0; if (c == 0xed) hi = 0x9f; }
    else if (c >= 0xf0 && c <= 0xf4) { len = 4; if (c == 0xf0) lo = 0x90; if (c == 0xf4) hi = 0x8f; }
    else return 0;
    if (n < len || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xbf)
            return 0;
    *cp = len == 2 ? (c & 0x1f) << 6 | (s[1] & 0x3f)
        : len == 3 ? (c & 0x0f) << 12 | (s[1] & 0x3f) << 6 | (s[2] & 0x3f)
        : (c & 0x07) << 18 | (s[1] & 0x3f) << 12 | (s[2] & 0x3f) << 6 | (s[3] & 0x3f);
    return len;
}

void jw_str(struct buf *b, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    buf_addc(b, '"');
    for (size_t i = 0; i < n;) {
        unsigned cp;
        size_t len = utf8_len(u + i, n - i, &cp);
        if (!len) {                      /* surrogateescape: one lone byte -> U+DC80+byte */
            u_esc(b, 0xdc00 + u[i]);
            i++;
            continue;
        }
        i += len;
        if (cp == '"') buf_adds(b, "\\\"");
        else if (cp == '\\') buf_adds(b, "\\\\");
        else if (cp == '\n') buf_adds(b, "\\n");
        else if (cp == '\r') buf_adds(b, "\\r");
        else if (cp == '\t') buf_adds(b, "\\t");
        else if (cp == '\b') buf_adds(b, "\\b");
        else if (cp == '\f') buf_adds(b, "\\f");
        else if (cp >= 0x20 && cp <= 0x7e) buf_addc(b, (char)cp);
        else if (cp < 0x10000) u_esc(b, cp);
        else {
            cp -= 0x10000;
            u_esc(b, 0xd800 | (cp >> 10));
            u_esc(b, 0xdc00 | (cp & 0x3ff));
        }
    }
    buf_addc(b, '"');
}

void jw_cstr(struct buf *b, const char *s) { jw_str(b, s, strlen(s)); }

void jw_key(struct buf *b, const char *key)
{
    if (b->n && b->p[b->n - 1] != '{' && b->p[b->n - 1] != '[')
        buf_addc(b, ',');
    jw_cstr(b, key);
    buf_addc(b, ':');
}

void jw_int(struct buf *b, long long v)
{
    char t[32];
    buf_add(b, t, (size_t)snprintf(t, sizeof t, "%lld", v));
}

void jw_strv(struct buf *b, char *const *v, int n)
{
    buf_addc(b, '[');
    for (int i = 0; i < n; i++) {
        if (i)
            buf_addc(b, ',');
        jw_cstr(b, v[i]);
    }
    buf_addc(b, ']');
}

/* protocol.env_pairs(os.environ.items()): [[key, value], ...] in environ order. Python's os.environ
 * skips entries without '=', splits at the first '=', and keeps the first of
 * repeated keys (posixmodule's PyDict_SetDefault). */
void jw_env(struct buf *b, char **envp)
{
    int n = 0;
    while (envp && envp[n])
        n++;
    buf_addc(b, '[');
    int first = 1;
    for (int i = 0; i < n; i++) {
        const char *eq = strchr(envp[i], '=');
        if (!eq)
            continue;
        size_t klen = (size_t)(eq - envp[i]);
        int dup = 0;
        for (int j = 0; j < i && !dup; j++)
            dup = strncmp(envp[j], envp[i], klen + 1) == 0;
        if (dup)
            continue;
        const char *val = eq + 1;
        if (!first)
            buf_addc(b, ',');
        first = 0;
        buf_addc(b, '[');
        jw_str(b, envp[i], klen);
        buf_addc(b, ',');
        jw_cstr(b, val);
        buf_addc(b, ']');
    }
    buf_addc(b, ']');
}

void jw_request(struct buf *b, const char *op)
{
    buf_adds(b, "{\"v\":");
    jw_int(b, PROTO_VERSION);
    buf_adds(b, ",\"op\":");
    jw_cstr(b, op);
}

/* ---- reader ---------------------------------------------------------------------------------------- */

struct rd { const char *p, *end; };

static void ws(struct rd *r)
{
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

static int hex4(const char *p, const char *end, unsigned *out)
{
    if (end - p < 4)
        return 0;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}

static int skip_string(struct rd *r)
{
    if (r->p >= r->end || *r->p != '"')
        return 0;
    r->p++;
    while (r->p < r->end) {
        unsigned char c = (unsigned char)*r->p;
        if (c == '"') { r->p++; return 1; }
        if (c < 0x20) return 0;
        if (c == '\\') {
            r->p++;
            if (r->p >= r->end) return 0;
            char e = *r->p;
            if (e == 'u') {
                unsigned v;
                if (!hex4(r->p + 1, r->end, &v)) return 0;
                r->p += 5;
                continue;
            }
            if (!strchr("\"\\/bfnrt", e) || !e) return 0;
        }
        r->p++;
    }
    return 0;
}

static int skip_value(struct rd *r, int depth);

static int skip_number(struct rd *r)
{
    const char *s = r->p;
    if (r->p < r->end && *r->p == '-') r->p++;
    if (r->p >= r->end) return 0;
    if (*r->p == '0') r->p++;
    else if (*r->p >= '1' && *r->p <= '9') while (r->p < r->end && *r->p >= '0' && *r->p <= '9') r->p++;
    else return 0;
    if (r->p < r->end && *r->p == '.') {
        r->p++;
        if (r->p >= r->end || *r->p < '0' || *r->p > '9') return 0;
        while (r->p < r->end && *r->p >= '0' && *r->p <= '9') r->p++;
    }
    if (r->p < r->end && (*r->p == 'e' || *r->p == 'E')) {
        r->p++;
        if (r->p < r->end && (*r->p == '+' || *r->p == '-')) r->p++;
        if (r->p >= r->end || *r->p < '0' || *r->p > '9') return 0;
        while (r->p < r->end && *r->p >= '0' && *r->p <= '9') r->p++;
    }
    return r->p > s;
}

static int skip_lit(struct rd *r, const char *lit)
{
    size_t n = strlen(lit);
    return (size_t)(r->end - r->p) >= n && !memcmp(r->p, lit, n) ? (r->p += n, 1) : 0;
}

static int skip_container(struct rd *r, int depth, char close)
{
    if (depth >= MAX_DEPTH) return 0;
    r->p++;                                   /* the opening bracket */
    ws(r);
    if (r->p < r->end && *r->p == close) { r->p++; return 1; }
    for (;;) {
        if (close == '}') {
            if (!skip_string(r)) return 0;
            ws(r);
            if (r->p >= r->end || *r->p != ':') return 0;
            r->p++;
            ws(r);
        }
        if (!skip_value(r, depth + 1)) return 0;
        ws(r);
        if (r->p >= r->end) return 0;
        if (*r->p == close) { r->p++; return 1; }
        if (*r->p != ',') return 0;
        r->p++;
        ws(r);
    }
}

static int skip_value(struct rd *r, int depth)
{
    if (r->p >= r->end) return 0;
    switch (*r->p) {
    case '{': return skip_container(r, depth, '}');
    case '[': return skip_container(r, depth, ']');
    case '"': return skip_string(r);
    case 't': return skip_lit(r, "true");
    case 'f': return skip_lit(r, "false");
    case 'n': return skip_lit(r, "null");
    default: return skip_number(r);
    }
}

int jr_valid(const char *p, size_t n)
{
    const unsigned char *u = (const unsigned char *)p;
    for (size_t i = 0; i < n;) {
        unsigned cp;
        size_t len = utf8_len(u + i, n - i, &cp);
        if (!len) return 0;
        i += len;
    }
    struct rd r = {p, p + n};
    ws(&r);
    if (r.p >= r.end || *r.p != '{' || !skip_value(&r, 0)) return 0;
    ws(&r);
    return r.p == r.end;
}

static enum jtype type_at(const char *p)
{
    switch (*p) {
    case '{': return J_OBJ;
    case '[': return J_ARR;
    case '"': return J_STR;
    case 't': return J_TRUE;
    case 'f': return J_FALSE;
    case 'n': return J_NULL;
    default: return J_NUM;
    }
}

struct jval jr_root(const char *p, size_t n)
{
    struct jval v = {J_NONE, p, n};
    struct rd r = {p, p + n};
    ws(&r);
    if (r.p < r.end && *r.p == '{') { v.t = J_OBJ; v.p = r.p; v.n = (size_t)(r.end - r.p); }
    return v;
}

/* The value of key in object obj (the last one if repeated, like a Python dict); J_NONE if absent.
 * obj must come from a frame jr_valid accepted. */
struct jval jr_get(struct jval obj, const char *key)
{
    struct jval found = {J_NONE, NULL, 0};
    if (obj.t != J_OBJ) return found;
    struct rd r = {obj.p + 1, obj.p + obj.n};
    struct buf k = {0};
    ws(&r);
    while (r.p < r.end && *r.p == '"') {
        struct jval ks = {J_STR, r.p, 0};
        if (!skip_string(&r)) break;
        ks.n = (size_t)(r.p - ks.p);
        ws(&r);
        if (r.p >= r.end || *r.p != ':') break;
        r.p++;
        ws(&r);
        const char *vs = r.p;
        if (!skip_value(&r, 1)) break;
        k.n = 0;
        if (jr_str(ks, &k) && strlen(buf_str(&k)) == k.n && strcmp(k.p, key) == 0) {
            found.t = type_at(vs);
            found.p = vs;
            found.n = (size_t)(r.p - vs);
        }
        ws(&r);
        if (r.p >= r.end || *r.p != ',') break;
        r.p++;
        ws(&r);
    }
    buf_free(&k);
    return found;
}

static void put_utf8(struct buf *b, unsigned cp)
{
    char o[4];
    if (cp < 0x80) { buf_addc(b, (char)cp); return; }
    if (cp < 0x800) { o[0] = (char)(0xc0 | cp >> 6); o[1] = (char)(0x80 | (cp & 0x3f)); buf_add(b, o, 2); return; }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | cp >> 12); o[1] = (char)(0x80 | (cp >> 6 & 0x3f)); o[2] = (char)(0x80 | (cp & 0x3f));
        buf_add(b, o, 3);
        return;
    }
    o[0] = (char)(0xf0 | cp >> 18); o[1] = (char)(0x80 | (cp >> 12 & 0x3f));
    o[2] = (char)(0x80 | (cp >> 6 & 0x3f)); o[3] = (char)(0x80 | (cp & 0x3f));
    buf_add(b, o, 4);
}

int jr_str(struct jval v, struct buf *out)
{
    if (v.t != J_STR || v.n < 2) return 0;
    const char *p = v.p + 1, *end = v.p + v.n - 1;
    while (p < end) {
        if (*p != '\\') { buf_addc(out, *p++); continue; }
        p++;
        if (p >= end) return 0;
        char e = *p++;
        switch (e) {
        case 'n': buf_addc(out, '\n'); break;
        case 't': buf_addc(out, '\t'); break;
        case 'r': buf_addc(out, '\r'); break;
        case 'b': buf_addc(out, '\b'); break;
        case 'f': buf_addc(out, '\f'); break;
        case 'u': {
            unsigned cp, lo;
            if (!hex4(p, end, &cp)) return 0;
            p += 4;
            if (cp >= 0xd800 && cp < 0xdc00 && end - p >= 6 && p[0] == '\\' && p[1] == 'u'
                && hex4(p + 2, end, &lo) && lo >= 0xdc00 && lo < 0xe000) {
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                p += 6;
            } else if (cp >= 0xdc80 && cp <= 0xdcff) {
                buf_addc(out, (char)(cp - 0xdc00));   /* surrogateescape'd byte back to the byte */
                break;
            }
            put_utf8(out, cp);
            break;
        }
        default: buf_addc(out, e); break;
        }
    }
    return 1;
}

int jr_int(struct jval v, long long *out)
{
    if (v.t != J_NUM || v.n == 0 || v.n > 19) return 0;
    long long x = 0;
    size_t i = 0;
    int neg = v.p[0] == '-';
    if (neg) i = 1;
    if (i >= v.n) return 0;
    for (; i < v.n; i++) {
        if (v.p[i] < '0' || v.p[i] > '9') return 0;    /* 1.0 or 1e3 is not an int, as in Python */
        x = x * 10 + (v.p[i] - '0');
    }
    *out = neg ? -x : x;
    return 1;
}
