/*
 * tls-source: smtp-source's job with STARTTLS on every connection (bench_tls.py, issue #12).
 *
 *   cc -O2 -o tls-source loadtest/tls_source.c -lssl -lcrypto -lpthread
 *   tls-source [-s sessions] [-m messages] [-l size] [-c ca.pem] [-R] [-P] host port
 *
 * Postfix's smtp-source speaks no TLS, and smtpfleet's Python generator spends 2-3 ms of CPU
 * on each TLS connection (CPython copies the session and decodes the peer certificate through
 * OpenSSL 3.0's decoders), as much as the servers it measures on a two-core machine. This
 * sends the same messages (one per connection: EHLO, STARTTLS, EHLO, MAIL, RCPT, DATA, QUIT)
 * from `sessions` threads with blocking sockets, and prints one JSON line: the reply codes,
 * how many handshakes resumed a session, and the accept latency (final dot to reply).
 *
 * -c verifies the server's certificate against that CA and the name "localhost"; without it
 * the certificate is not checked, as most MTA-to-MTA TLS is (opportunistic, RFC 7435).
 * -R keeps each thread's last TLS session and offers it on its next connection, as a sending
 * MTA's TLS session cache does (Postfix's smtp_tls_session_cache_database).
 * -P sends in clear (no STARTTLS), so that both columns of the benchmark use the same tool.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_CODE 600
#define TIMEOUT_S 30

static struct sockaddr_in target;
static SSL_CTX *context;
static long total = 1000;
static int resume, plain;
static atomic_long next_message;
static atomic_long codes[MAX_CODE];
static atomic_long resumed, handshakes;
static char run_id[32]; /* in every Message-ID: a node drops a repeated one as a retry */
static double *latencies; /* seconds, one slot per message; < 0 where none was measured */
static const char *message_head = "From: <load@example.com>\r\nTo: <sink@example.net>\r\n";

struct conn {
    int fd;
    SSL *ssl;
    char buf[8192];
    int len, pos;
};

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int send_all(struct conn *c, const char *data, size_t n)
{
    while (n > 0) {
        int sent = c->ssl ? SSL_write(c->ssl, data, (int)n) : (int)send(c->fd, data, n, 0);
        if (sent <= 0)
            return -1;
        data += sent;
        n -= (size_t)sent;
    }
    return 0;
}

static int fill(struct conn *c)
{
    int got = c->ssl ? SSL_read(c->ssl, c->buf, sizeof c->buf)
                     : (int)recv(c->fd, c->buf, sizeof c->buf, 0);
    if (got <= 0)
        return -1;
    c->len = got;
    c->pos = 0;
    return 0;
}

/* One reply, multi-line or not: its code, or -1 when the connection failed. */
static int reply(struct conn *c)
{
    char line[1024];
    for (;;) {
        int n = 0;
        for (;;) {
            if (c->pos == c->len && fill(c) < 0)
                return -1;
            char ch = c->buf[c->pos++];
            if (n < (int)sizeof line - 1)
                line[n++] = ch;
            if (ch == '\n')
                break;
        }
        line[n] = 0;
        if (n < 4)
            return -1;
        if (line[3] != '-')
            return atoi(line);
    }
}

static int command(struct conn *c, const char *text)
{
    return send_all(c, text, strlen(text)) < 0 ? -1 : reply(c);
}

static int dial(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    struct timeval timeout = {TIMEOUT_S, 0};
    if (fd < 0)
        return -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* The TLS part of the session; the thread's cached session is offered and refreshed. */
static int upgrade(struct conn *c, SSL_SESSION **cached)
{
    c->ssl = SSL_new(context);
    if (!c->ssl)
        return -1;
    SSL_set_fd(c->ssl, c->fd);
    SSL_set_tlsext_host_name(c->ssl, "localhost");
    if (resume && *cached)
        SSL_set_session(c->ssl, *cached);
    if (SSL_connect(c->ssl) != 1)
        return -1;
    atomic_fetch_add(&handshakes, 1);
    if (SSL_session_reused(c->ssl))
        atomic_fetch_add(&resumed, 1);
    c->len = c->pos = 0; /* RFC 3207 §4.2: nothing read before the handshake counts */
    if (command(c, "EHLO tls-source.localhost\r\n") != 250)
        return -1;
    /* A TLS 1.3 ticket arrives after the handshake: the EHLO reply's read took it in. */
    if (resume && !SSL_session_reused(c->ssl)) {
        SSL_SESSION *fresh = SSL_get1_session(c->ssl);
        if (fresh && SSL_SESSION_is_resumable(fresh)) {
            if (*cached)
                SSL_SESSION_free(*cached);
            *cached = fresh;
        } else if (fresh) {
            SSL_SESSION_free(fresh);
        }
    }
    return 0;
}

/* One message on a new connection: its final reply code, 0 when the session failed. */
static int one_message(long n, const char *body, size_t body_len, SSL_SESSION **cached)
{
    struct conn c = {.fd = dial()};
    char head[256];
    int code = 0;
    if (c.fd < 0)
        return 0;
    if (reply(&c) != 220 || command(&c, "EHLO tls-source.localhost\r\n") != 250)
        goto done;
    if (!plain && (command(&c, "STARTTLS\r\n") != 220 || upgrade(&c, cached) < 0))
        goto done;
    if ((code = command(&c, "MAIL FROM:<load@example.com>\r\n")) != 250 ||
        (code = command(&c, "RCPT TO:<sink@example.net>\r\n")) != 250 ||
        (code = command(&c, "DATA\r\n")) != 354)
        goto done;
    snprintf(head, sizeof head, "%sSubject: load %ld\r\nMessage-ID: <%s-%ld@tls-source>\r\n\r\n",
             message_head, n, run_id, n);
    code = 0;
    if (send_all(&c, head, strlen(head)) < 0)
        goto done;
    double started = now();
    if (send_all(&c, body, body_len) < 0 || (code = reply(&c)) < 0) {
        code = 0;
        goto done;
    }
    latencies[n] = now() - started;
    command(&c, "QUIT\r\n");
done:
    if (c.ssl) {
        SSL_shutdown(c.ssl);
        SSL_free(c.ssl);
    }
    close(c.fd);
    return code;
}

struct sender {
    pthread_t thread;
    const char *body;
    size_t body_len;
};

static void *send_loop(void *arg)
{
    struct sender *s = arg;
    SSL_SESSION *cached = NULL;
    long n;
    while ((n = atomic_fetch_add(&next_message, 1)) < total) {
        int code = one_message(n, s->body, s->body_len, &cached);
        atomic_fetch_add(&codes[code > 0 && code < MAX_CODE ? code : 0], 1);
    }
    if (cached)
        SSL_SESSION_free(cached);
    return NULL;
}

static char *make_body(long size, size_t *len)
{
    static const char line[] = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n";
    size_t lines = size > 200 ? (size_t)(size - 200) / (sizeof line - 1) : 1;
    char *body = malloc(lines * (sizeof line - 1) + 4);
    if (!body)
        return NULL;
    for (size_t i = 0; i < lines; i++)
        memcpy(body + i * (sizeof line - 1), line, sizeof line - 1);
    memcpy(body + lines * (sizeof line - 1), ".\r\n", 4);
    *len = lines * (sizeof line - 1) + 3;
    return body;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void report(double elapsed)
{
    long measured = 0;
    for (long i = 0; i < total; i++)
        if (latencies[i] >= 0)
            latencies[measured++] = latencies[i];
    qsort(latencies, (size_t)measured, sizeof *latencies, by_value);
#define AT(f) (measured ? 1000 * latencies[(long)((f) * (measured - 1))] : 0.0)
    printf("{\"sent\": %ld, \"accepted\": %ld, \"elapsed_s\": %.3f, \"handshakes\": %ld, "
           "\"resumed\": %ld, \"latency_ms\": {\"p50\": %.2f, \"p90\": %.2f, \"p99\": %.2f}, "
           "\"codes\": {",
           total, atomic_load(&codes[250]), elapsed, atomic_load(&handshakes),
           atomic_load(&resumed), AT(0.5), AT(0.9), AT(0.99));
    const char *comma = "";
    for (int code = 0; code < MAX_CODE; code++)
        if (atomic_load(&codes[code])) {
            printf("%s\"%d\": %ld", comma, code, atomic_load(&codes[code]));
            comma = ", ";
        }
    printf("}}\n");
}

static int usage(void)
{
    fprintf(stderr, "usage: tls-source [-s sessions] [-m messages] [-l size] [-c ca.pem] [-R] "
                    "[-P] host port\n");
    return 2;
}

int main(int argc, char **argv)
{
    int sessions = 50, opt;
    long size = 2048;
    const char *ca_file = NULL;
    while ((opt = getopt(argc, argv, "s:m:l:c:RP")) != -1) {
        switch (opt) {
        case 's': sessions = atoi(optarg); break;
        case 'm': total = atol(optarg); break;
        case 'l': size = atol(optarg); break;
        case 'c': ca_file = optarg; break;
        case 'R': resume = 1; break;
        case 'P': plain = 1; break;
        default: return usage();
        }
    }
    if (argc - optind != 2 || sessions < 1 || total < 1)
        return usage();
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)atoi(argv[optind + 1]));
    if (inet_pton(AF_INET, argv[optind], &target.sin_addr) != 1) {
        fprintf(stderr, "tls-source: %s is not an IPv4 address\n", argv[optind]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN); /* a server that hangs up is a failed message, not our end */
    context = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(context, TLS1_2_VERSION);
    if (ca_file) {
        if (SSL_CTX_load_verify_locations(context, ca_file, NULL) != 1) {
            fprintf(stderr, "tls-source: cannot read the CA file %s\n", ca_file);
            return 2;
        }
        SSL_CTX_set_verify(context, SSL_VERIFY_PEER, NULL);
        X509_VERIFY_PARAM_set1_host(SSL_CTX_get0_param(context), "localhost", 0);
    }
    snprintf(run_id, sizeof run_id, "%lx-%x", (long)time(NULL), (unsigned)getpid());
    size_t body_len;
    char *body = make_body(size, &body_len);
    latencies = malloc((size_t)total * sizeof *latencies);
    struct sender *senders = calloc((size_t)sessions, sizeof *senders);
    if (!body || !latencies || !senders)
        return 2;
    for (long i = 0; i < total; i++)
        latencies[i] = -1;
    double started = now();
    for (int i = 0; i < sessions; i++) {
        senders[i] = (struct sender){.body = body, .body_len = body_len};
        if (pthread_create(&senders[i].thread, NULL, send_loop, &senders[i]) != 0)
            return 2;
    }
    for (int i = 0; i < sessions; i++)
        pthread_join(senders[i].thread, NULL);
    report(now() - started);
    return 0;
}
