/* cli — client subcommands of the archmirror command; see include/archmirror/cli.h. */
#include "archmirror/cli.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "archmirror/buf.h"
#include "archmirror/http.h"

#define EXIT_MISSING 1
#define EXIT_USAGE   2
#define EXIT_SERVER  3
#define MAX_RESPONSE (64u << 20)

static const char usage[] =
    "usage: archmirror platforms [--server URL] [--json] IMAGE...\n"
    "       archmirror audit --require PLATFORM [--require PLATFORM...] [--server URL]\n"
    "                        [--json] [FILE|-]\n"
    "\n"
    "Ask a running archmirror which platforms images ship. `audit` reads image references\n"
    "(whitespace-separated, e.g. kubectl get pods -A -o jsonpath='{..image}') from FILE or\n"
    "standard input and exits 1 when any of them misses a required platform.\n"
    "  --server URL   archmirror to ask (default http://127.0.0.1:5000; its admin listener\n"
    "                 when admin.listen is set)\n"
    "  --token-file F bearer token for an admin side that requires one (admin.token_file)\n"
    "  --json         print the API's JSON instead of a table\n";

int am_cli_is_command(int argc, char **argv)
{
    return argc > 1 && (strcmp(argv[1], "platforms") == 0 || strcmp(argv[1], "audit") == 0);
}

/* Splits "http://host:port" into host and port. */
static int parse_server(const char *url, char *host, size_t hl, char *port, size_t pl)
{
    const char *p = url;
    if (strncmp(p, "http://", 7) == 0)
        p += 7;
    else if (strstr(p, "://"))
        return -1; /* https would need TLS: not for a local admin API */
    const char *colon = strrchr(p, ':');
    const char *slash = strchr(p, '/');
    size_t n = colon ? (size_t)(colon - p) : slash ? (size_t)(slash - p) : strlen(p);
    if (n == 0 || n >= hl) return -1;
    memcpy(host, p, n);
    host[n] = '\0';
    if (host[0] == '[' && host[n - 1] == ']') {
        memmove(host, host + 1, n - 2);
        host[n - 2] = '\0';
    }
    snprintf(port, pl, "%.*s", colon ? (int)strcspn(colon + 1, "/") : 4,
             colon ? colon + 1 : "5000");
    return 0;
}

/* One HTTP/1.1 exchange with Connection: close. Returns the status (and the body in
 * out), or -1 with a reason printed. */
static int http_call(const char *server, const char *method, const char *target, const char *body,
                     const char *token, struct am_buf *out)
{
    char host[256], port[16];
    if (parse_server(server, host, sizeof host, port, sizeof port)) {
        fprintf(stderr, "archmirror: --server %s: expected http://HOST:PORT\n", server);
        return -1;
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai = NULL;
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc) {
        fprintf(stderr, "archmirror: %s: %s\n", server, gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
        if (fd >= 0) close(fd);
        fd = -1;
    }
    freeaddrinfo(ai);
    if (fd < 0) {
        fprintf(stderr, "archmirror: cannot connect to %s: %s\n", server, strerror(errno));
        return -1;
    }
    struct am_buf req;
    am_buf_init(&req, MAX_RESPONSE);
    size_t blen = body ? strlen(body) : 0;
    rc = am_buf_appendf(&req,
                        "%s %s HTTP/1.1\r\nHost: %s:%s\r\nUser-Agent: archmirror-cli\r\n"
                        "Accept: application/json\r\nConnection: close\r\n",
                        method, target, host, port);
    if (!rc && body)
        rc =
            am_buf_appendf(&req, "Content-Type: application/json\r\nContent-Length: %zu\r\n", blen);
    if (!rc && token) rc = am_buf_appendf(&req, "Authorization: Bearer %s\r\n", token);
    if (!rc) rc = am_buf_append_str(&req, "\r\n");
    if (!rc && body) rc = am_buf_append(&req, body, blen);
    for (size_t off = 0; !rc && off < req.len;) {
        ssize_t w = write(fd, req.data + off, req.len - off);
        if (w <= 0)
            rc = -1;
        else
            off += (size_t)w;
    }
    explicit_bzero(req.data, req.len);
    am_buf_cleanup(&req);
    struct am_buf resp;
    am_buf_init(&resp, MAX_RESPONSE);
    char chunk[65536];
    ssize_t r;
    while (!rc && (r = read(fd, chunk, sizeof chunk)) > 0)
        rc = am_buf_append(&resp, chunk, (size_t)r);
    close(fd);
    int status = -1;
    char *sep = resp.data ? strstr(resp.data, "\r\n\r\n") : NULL;
    if (rc || !sep || sscanf(resp.data, "HTTP/1.%*c %d", &status) != 1) {
        fprintf(stderr, "archmirror: %s: no valid HTTP response\n", server);
        am_buf_cleanup(&resp);
        return -1;
    }
    /* Connection: close: the body is everything after the head (no chunking from us). */
    am_buf_append(out, sep + 4, resp.len - (size_t)(sep + 4 - resp.data));
    am_buf_cleanup(&resp);
    return status;
}

static const char *str(json_t *o, const char *k)
{
    const char *s = json_string_value(json_object_get(o, k));
    return s ? s : "";
}

static void platforms_text(json_t *platforms, char *out, size_t cap)
{
    size_t len = 0;
    out[0] = '\0';
    for (size_t i = 0; i < json_array_size(platforms); i++) {
        json_t *p = json_array_get(platforms, i);
        int w;
        if (json_is_string(p)) { /* "missing" lists platform strings */
            w = snprintf(out + len, cap - len, "%s%s", i ? "," : "", json_string_value(p));
        } else {
            const char *v = str(p, "variant");
            w = snprintf(out + len, cap - len, "%s%s/%s%s%s", i ? "," : "", str(p, "os"),
                         str(p, "architecture"), *v ? "/" : "", v);
        }
        if (w < 0 || (size_t)w >= cap - len) break;
        len += (size_t)w;
    }
}

/* Prints one result line; returns whether it was an error entry. */
static bool print_result(json_t *r, json_t *missing_for)
{
    char plats[512];
    json_t *err = json_object_get(r, "error");
    const char *image = *str(r, "image") ? str(r, "image") : str(r, "repository");
    if (err) {
        printf("%-60s  ERROR  %s: %s\n", image, str(err, "code"), str(err, "message"));
        return true;
    }
    platforms_text(json_object_get(r, "platforms"), plats, sizeof plats);
    char miss[256] = "";
    if (missing_for) platforms_text(missing_for, miss, sizeof miss);
    printf("%-60s  %-5s  %-40s  %s\n", image,
           json_is_true(json_object_get(r, "multiArch")) ? "yes" : "no", plats, miss);
    return false;
}

/* The "missing" entry's platforms for an image, as platform objects, or NULL. */
static json_t *missing_of(json_t *missing, const char *image)
{
    for (size_t i = 0; i < json_array_size(missing); i++) {
        json_t *m = json_array_get(missing, i);
        if (strcmp(str(m, "image"), image) == 0) return json_object_get(m, "platforms");
    }
    return NULL;
}

static int read_images(const char *file, json_t *images)
{
    FILE *f = strcmp(file, "-") == 0 ? stdin : fopen(file, "r");
    if (!f) {
        fprintf(stderr, "archmirror: %s: %s\n", file, strerror(errno));
        return -1;
    }
    char word[1024];
    while (fscanf(f, "%1023s", word) == 1) {
        bool dup = false;
        for (size_t i = 0; i < json_array_size(images) && !dup; i++)
            dup = strcmp(json_string_value(json_array_get(images, i)), word) == 0;
        if (!dup) json_array_append_new(images, json_string(word));
    }
    if (f != stdin) fclose(f);
    return 0;
}

int am_cli_main(int argc, char **argv)
{
    bool audit = strcmp(argv[1], "audit") == 0, json_out = false;
    const char *server = "http://127.0.0.1:5000";
    char token[512] = "";
    json_t *require = json_array(), *images = json_array();
    static const struct option opts[] = {
        {"server", required_argument, NULL, 's'}, {"require", required_argument, NULL, 'r'},
        {"json", no_argument, NULL, 'j'},         {"token-file", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0}};
    int c, status = EXIT_USAGE;
    optind = 2;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 's': server = optarg; break;
        case 'r': json_array_append_new(require, json_string(optarg)); break;
        case 'j': json_out = true; break;
        case 't': {
            FILE *tf = fopen(optarg, "r");
            if (!tf || !fgets(token, sizeof token, tf)) {
                fprintf(stderr, "archmirror: --token-file %s: cannot read it\n", optarg);
                if (tf) fclose(tf);
                goto done;
            }
            fclose(tf);
            token[strcspn(token, "\r\n")] = '\0';
            break;
        }
        case 'h':
            fputs(usage, stdout);
            status = 0;
            goto done;
        default: fputs(usage, stderr); goto done;
        }
    }
    if (audit) {
        if (json_array_size(require) == 0 || argc - optind > 1) {
            fputs(usage, stderr);
            goto done;
        }
        if (read_images(optind < argc ? argv[optind] : "-", images)) goto done;
    } else {
        if (optind == argc) {
            fputs(usage, stderr);
            goto done;
        }
        for (int i = optind; i < argc; i++) json_array_append_new(images, json_string(argv[i]));
    }
    json_t *q = json_pack("{s:O}", "images", images);
    if (json_array_size(require)) json_object_set(q, "require", require);
    char *body = json_dumps(q, JSON_COMPACT);
    json_decref(q);
    struct am_buf resp;
    am_buf_init(&resp, MAX_RESPONSE);
    int http = http_call(server, "POST", "/api/v1/platforms", body, token[0] ? token : NULL, &resp);
    free(body);
    status = EXIT_SERVER;
    json_t *doc = resp.data ? json_loads(resp.data, 0, NULL) : NULL;
    if (http < 0 || !doc || http != 200) {
        if (http >= 0)
            fprintf(stderr, "archmirror: %s answered %d: %s\n", server, http,
                    resp.data ? resp.data : "");
        json_decref(doc);
        am_buf_cleanup(&resp);
        goto done;
    }
    json_t *results = json_object_get(doc, "results"), *missing = json_object_get(doc, "missing");
    bool errors = false;
    if (json_out) {
        fwrite(resp.data, 1, resp.len, stdout);
        if (resp.len && resp.data[resp.len - 1] != '\n') putchar('\n');
        for (size_t i = 0; i < json_array_size(results); i++)
            errors |= json_object_get(json_array_get(results, i), "error") != NULL;
    } else {
        printf("%-60s  %-5s  %-40s  %s\n", "IMAGE", "MULTI", "PLATFORMS", audit ? "MISSING" : "");
        for (size_t i = 0; i < json_array_size(results); i++) {
            json_t *r = json_array_get(results, i);
            errors |= print_result(r, missing_of(missing, str(r, "image")));
        }
    }
    status = json_array_size(missing) ? EXIT_MISSING : errors ? EXIT_SERVER : 0;
    if (!audit && status == EXIT_MISSING) status = 0; /* platforms only reports */
    json_decref(doc);
    am_buf_cleanup(&resp);
done:
    explicit_bzero(token, sizeof token);
    json_decref(require);
    json_decref(images);
    return status;
}
