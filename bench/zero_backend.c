/* zero_backend: a zero-latency HTTP/1.1 backend for bench/overhead.py.
 *
 * The overhead benchmark measures what the balancer costs per request. A Python
 * backend would burn CPU on the same cores and be billed to the balancer; this
 * server answers every request with a fixed 11-byte JSON body in microseconds,
 * so nearly all the CPU the benchmark sees is the balancer's.
 *
 *     zero_backend PORT [PORT ...]      (binds 127.0.0.1; one process, one thread)
 *
 * Request bodies are read and discarded, by Content-Length or by chunked
 * Transfer-Encoding (sizes honoured; extensions and trailers skipped unchecked).
 * Heads over 16 KiB get 431 and a close; malformed lengths get 400 and a close.
 * Pipelined requests are answered in order. Keep-alive unless the request says
 * "Connection: close" or is HTTP/1.0 without "Connection: keep-alive".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define IN_CAP 16384   /* also the head limit: a head must fit the input buffer */
#define OUT_CAP 4096
#define ANSWER_MAX 128 /* room needed in `out` before starting on a request */

static const char OK[] = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         "Content-Length: 11\r\n\r\n{\"ok\":true}";
static const char E431[] = "HTTP/1.1 431 Request Header Fields Too Large\r\n"
                           "Content-Length: 0\r\nConnection: close\r\n\r\n";
static const char E400[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                           "Connection: close\r\n\r\n";

enum phase { HEAD, BODY, CHUNK_SIZE, CHUNK_TRAILER };

struct conn {
    int fd, listening;
    unsigned events;                  /* current epoll interest, to skip no-op epoll_ctl */
    enum phase phase;
    unsigned long long body_left;     /* body bytes (in chunked mode: chunk + CRLF) to drop */
    int chunked, is_head, keep_alive, closing;   /* closing: close once `out` is sent */
    size_t in_len, out_len, out_sent;
    char in[IN_CAP], out[OUT_CAP];
};

static volatile sig_atomic_t stopping;
static int ep;

static void on_term(int sig) { (void)sig; stopping = 1; }

static void put(struct conn *c, const char *s, size_t n) {
    memcpy(c->out + c->out_len, s, n);
    c->out_len += n;
}

/* The request is complete: answer it, and stop reading if the connection ends here. */
static void answer(struct conn *c) {
    put(c, OK, c->is_head ? sizeof OK - 1 - 11 : sizeof OK - 1);
    c->closing = !c->keep_alive;
    c->phase = HEAD;
}

static void fail(struct conn *c, const char *msg, size_t n) {
    put(c, msg, n);
    c->closing = 1;
}

/* Does the header value v[0..n) contain `tok`, ignoring case? (Good enough for
 * "chunked", "close" and "keep-alive"; no full token-list parsing.) */
static int has(const char *v, size_t n, const char *tok) {
    size_t t = strlen(tok);
    for (size_t i = 0; i + t <= n; i++)
        if (strncasecmp(v + i, tok, t) == 0) return 1;
    return 0;
}

/* Parse a complete head p[0..n) (ending in CRLF CRLF); set up the body phase. */
static void parse_head(struct conn *c, const char *p, size_t n) {
    const char *line_end = memmem(p, n, "\r\n", 2), *end = p + n;
    c->is_head = (line_end - p >= 5 && memcmp(p, "HEAD ", 5) == 0);
    c->keep_alive = !(line_end - p >= 8 && memcmp(line_end - 8, "HTTP/1.0", 8) == 0);
    c->chunked = 0;
    c->body_left = 0;
    for (const char *l = line_end + 2; l < end - 2; l = line_end + 2) {
        line_end = memmem(l, end - l, "\r\n", 2);
        const char *colon = memchr(l, ':', line_end - l);
        if (!colon) continue;
        size_t name = colon - l, vn = line_end - colon - 1;
        const char *v = colon + 1;
        if (name == 14 && strncasecmp(l, "Content-Length", 14) == 0) {
            char *stop;
            while (vn && *v == ' ') v++, vn--;
            c->body_left = strtoull(v, &stop, 10);
            /* A length that is not all digits would desynchronise the stream: refuse. */
            if (vn == 0 || *v < '0' || *v > '9' || (stop < line_end && *stop != ' ')) {
                fail(c, E400, sizeof E400 - 1);
                return;
            }
        } else if (name == 17 && strncasecmp(l, "Transfer-Encoding", 17) == 0) {
            c->chunked = has(v, vn, "chunked");
        } else if (name == 10 && strncasecmp(l, "Connection", 10) == 0) {
            if (has(v, vn, "close")) c->keep_alive = 0;
            else if (has(v, vn, "keep-alive")) c->keep_alive = 1;
        }
    }
    if (c->chunked) c->phase = CHUNK_SIZE;    /* chunked wins over Content-Length (RFC 9112) */
    else if (c->body_left) c->phase = BODY;
    else answer(c);
}

/* Consume buffered input, appending answers to `out`. Stops when input runs out,
 * when closing, or when `out` has no room for another answer: then it returns 1,
 * and the caller drains `out` before calling again (backpressure on pipelining). */
static int process(struct conn *c) {
    size_t pos = 0;
    int full = 0;
    while (!c->closing && pos < c->in_len) {
        char *p = c->in + pos, *eol;
        size_t n = c->in_len - pos;
        if (c->phase == BODY) {
            size_t k = n < c->body_left ? n : (size_t)c->body_left;
            pos += k;
            if ((c->body_left -= k) == 0) {
                if (c->chunked) c->phase = CHUNK_SIZE;
                else answer(c);
            }
        } else if (c->phase == HEAD) {
            if (OUT_CAP - c->out_len < ANSWER_MAX) { full = 1; break; }
            if (n >= 2 && p[0] == '\r' && p[1] == '\n') { pos += 2; continue; } /* RFC 9112 2.2 */
            char *end = memmem(p, n, "\r\n\r\n", 4);
            if (!end) {
                if (n == IN_CAP) fail(c, E431, sizeof E431 - 1);
                break;
            }
            pos += end + 4 - p;
            parse_head(c, p, end + 4 - p);
        } else if ((eol = memmem(p, n, "\r\n", 2)) == NULL) {
            if (n == IN_CAP) fail(c, E400, sizeof E400 - 1);
            break;
        } else if (c->phase == CHUNK_SIZE) {
            char *stop;
            unsigned long long size = strtoull(p, &stop, 16);
            if (stop == p) { fail(c, E400, sizeof E400 - 1); break; }
            pos += eol + 2 - p;
            if (size == 0) c->phase = CHUNK_TRAILER;
            else { c->body_left = size + 2; c->phase = BODY; }  /* + the CRLF after the data */
        } else {  /* CHUNK_TRAILER: skip lines up to the empty one */
            pos += eol + 2 - p;
            if (eol == p) answer(c);
        }
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
    return full;
}

static void drop(struct conn *c) {
    close(c->fd);    /* also removes it from the epoll set */
    free(c);
}

static void want(struct conn *c, unsigned events) {
    if (c->events == events) return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->events = events;
}

/* Process and send until blocked. Returns -1 when the connection is to be dropped. */
static int pump(struct conn *c) {
    for (;;) {
        int full = process(c);
        while (c->out_sent < c->out_len) {
            ssize_t w = send(c->fd, c->out + c->out_sent, c->out_len - c->out_sent, MSG_NOSIGNAL);
            if (w < 0 && (errno == EAGAIN || errno == EINTR)) break;
            if (w < 0) return -1;
            c->out_sent += w;
        }
        if (c->out_sent < c->out_len) { want(c, EPOLLOUT); return 0; }  /* stop reading meanwhile */
        c->out_len = c->out_sent = 0;
        if (c->closing) return -1;
        if (!full) { want(c, EPOLLIN); return 0; }
        /* else input is waiting on room in `out`, which is empty now: go round again */
    }
}

static void on_readable(struct conn *c) {
    ssize_t r = 0;
    if (c->in_len < IN_CAP) r = recv(c->fd, c->in + c->in_len, IN_CAP - c->in_len, 0);
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (r <= 0) {   /* peer closed or reset, possibly mid-request: just forget it */
        drop(c);
        return;
    }
    c->in_len += r;
    if (pump(c) < 0) drop(c);
}

static void on_accept(struct conn *l) {
    for (;;) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK);
        if (fd < 0) return;   /* EAGAIN, or out of fds: retried on the next event */
        int one = 1;          /* answers are single small writes; don't let Nagle hold them */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        if (!c) { close(fd); continue; }
        c->fd = fd;
        c->events = EPOLLIN;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: zero_backend PORT [PORT ...]\n"); return 2; }
    /* SIGTERM/SIGINT stay blocked except inside epoll_pwait, so one can't slip in
     * between the `stopping` check and the wait and leave us asleep. */
    struct sigaction sa = {.sa_handler = on_term};
    sigset_t block, waiting;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &waiting);
    sigdelset(&waiting, SIGTERM);
    sigdelset(&waiting, SIGINT);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    ep = epoll_create1(0);
    for (int i = 1; i < argc; i++) {
        char *stop;
        long port = strtol(argv[i], &stop, 10);
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port),
                                   .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (*stop || port <= 0 || port > 65535 ||
            bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 1024) < 0) {
            fprintf(stderr, "zero_backend: cannot listen on 127.0.0.1:%s: %s\n", argv[i],
                    *stop || port <= 0 || port > 65535 ? "bad port" : strerror(errno));
            return 1;
        }
        struct conn *l = calloc(1, sizeof *l);
        l->fd = fd;
        l->listening = 1;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = l};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    struct epoll_event events[256];
    while (!stopping) {
        int n = epoll_pwait(ep, events, 256, -1, &waiting);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->listening) on_accept(c);
            else if (events[i].events & EPOLLOUT) { if (pump(c) < 0) drop(c); }
            else on_readable(c);   /* EPOLLIN, EPOLLHUP, EPOLLERR: recv tells which */
        }
    }
    return 0;
}
