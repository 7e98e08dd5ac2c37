/* cbatch-client: the C hot path of cbatch's clients (job starter, prologue/epilogue, `cbatch run`).
 * It speaks cbatch/protocol.py's wire format (docs/protocol.md) and decides nothing: it frames the
 * request, passes descriptors, forwards signals and exits with the status the daemon reports. */
#ifndef CBC_H
#define CBC_H
#include <stddef.h>
#include <sys/types.h>

#define EXIT_CBATCH 125
#define EXIT_CANNOT_INVOKE 126
#define EXIT_NOT_FOUND 127
#define PROTO_VERSION 1
#define MAX_MESSAGE (1u << 20)
#define MAX_FDS 3
#define FRAME_TIMEOUT 5.0
#define DEFAULT_SOCKET "/run/cbatch/cbatchd.sock"

/* util.c */
struct buf { char *p; size_t n, cap; };
void buf_add(struct buf *b, const void *data, size_t n);
void buf_adds(struct buf *b, const char *s);
void buf_addc(struct buf *b, char c);
void buf_free(struct buf *b);
const char *buf_str(struct buf *b);              /* NUL-terminated view */
void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void clean_add(struct buf *out, const char *s, size_t n);   /* errors.py's _clean */
void err_line(struct buf *out, const char *subject, const char *problem, const char *value, const char *hint);
void fail(int status, const char *subject, const char *problem, const char *value, const char *hint)
    __attribute__((noreturn));
double mono(void);
int ms_until(double deadline);
void pipe_ignore(void);            /* a vanished peer is an error we report, not a death */
void pipe_restore(void);           /* before exec: the job gets the disposition we were given */
void sleep_s(double s);
int write_all(int fd, const void *p, size_t n);

/* json.c: writer (Python json.dumps(ensure_ascii=True, separators=(",", ":")) byte for byte) */
void jw_str(struct buf *b, const char *s, size_t n);
void jw_cstr(struct buf *b, const char *s);
void jw_key(struct buf *b, const char *key);      /* "key": (with a leading comma unless after '{') */
void jw_int(struct buf *b, long long v);
void jw_strv(struct buf *b, char *const *v, int n);
void jw_env(struct buf *b, char **envp);
void jw_request(struct buf *b, const char *op);   /* {"v":1,"op":"<op>" (object left open) */
/* json.c: reader for replies; a value is a span of the frame's text */
enum jtype { J_NONE, J_OBJ, J_ARR, J_STR, J_NUM, J_TRUE, J_FALSE, J_NULL };
struct jval { enum jtype t; const char *p; size_t n; };
int jr_valid(const char *p, size_t n);             /* one JSON object, UTF-8, depth-bounded */
struct jval jr_get(struct jval obj, const char *key);
int jr_str(struct jval v, struct buf *out);         /* decoded string (UTF-8); 0 if not a string */
int jr_int(struct jval v, long long *out);          /* integer (not bool); 0 if not */
struct jval jr_root(const char *p, size_t n);

/* proto.c */
int cb_connect(const char *path, double timeout);
int frame_send(int sock, const struct buf *body, const int *fds, int nfds);
/* 1: a frame in *out; 0: clean close before a frame; -1: error (message in *err) */
int frame_recv(int sock, struct buf *out, struct buf *err);
/* the daemon's error reply as one line; returns its exit code (125 unless the reply says otherwise) */
int reply_error(struct jval msg, struct buf *line, struct buf *problem);

/* run.c */
struct session_opts {
    const char *socket;
    struct buf *request;          /* the encoded request object */
    int fds[3];
    int reraise_term;
    void (*on_native)(void *ctx, const int *pending, int npending);
    void *ctx;
};
int run_session(struct session_opts *o);
int call(const char *socket, struct buf *request, double timeout, struct buf *reply, struct buf *err,
         struct buf *problem);

/* starter.c, hooks.c, main.c */
int starter_main(const char *socket, int argc, char **argv, char **envp);
int prologue_main(const char *socket, int argc, char **argv);
int epilogue_main(const char *socket, int argc, char **argv);
int run_main(const char *socket, int argc, char **argv, char **envp);
extern char **environ;
#endif
