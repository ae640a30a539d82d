/* The host build of the embedded proplet: the same core as the device, with paho MQTT and
 * the wasmtime C library, so it joins a real broker and runs real wasm where no board is.
 *
 *   embedded-proplet --broker mqtt://127.0.0.1:1883 --id dev-1 --domain propeller
 *   embedded-proplet --settings proplet.conf --provision-pty /tmp/ttyPROPLET   (then provision)
 *   embedded-proplet --bench
 *
 * Trusted keys for module signatures come as the Python proplet takes them: PROPLET_TRUSTED_KEYS
 * (or --trusted-keys), ':'-separated PEM files; without either, from the provisioned trusted_keys.
 */
#define _DEFAULT_SOURCE /* gethostname, strtok_r */

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "../../core/bench.h"
#include "host.h"

typedef struct {
    const char *settings_path;
    const char *provision_tty;
    const char *provision_pty;
    proplet_settings_t overrides; /* values given on the command line win */
    unsigned slots;
    double heartbeat_s;
    double metrics_s;
    size_t max_module_bytes;
    size_t max_message_bytes;
    uint32_t stack_bytes;
    uint64_t max_memory_bytes;
    double default_timeout_s;
    uint32_t fetch_retry_ms;
    int log_level;
    bool bench;
    const char *trusted_key_files; /* --trusted-keys, else $PROPLET_TRUSTED_KEYS */
    trusted_keys_t trusted_keys;   /* read from them at start; used over the settings' keys */
} options_t;

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static void usage(FILE *out)
{
    fputs("usage: embedded-proplet [options]\n"
          "  --broker URL            broker, mqtt://host:port (settings key mqtt_url)\n"
          "  --id ID                 proplet id (proplet_id)\n"
          "  --domain NAME           topic domain, the manager's tenant_id (domain) [propeller]\n"
          "  --channel NAME          topic channel (channel) [default]\n"
          "  --username NAME, --password SECRET   MQTT credentials (mqtt_user, mqtt_pass)\n"
          "  --settings FILE         provisioned settings, the host's stand-in for NVS\n"
          "  --provision-tty PATH    serve the provisioning protocol on this tty\n"
          "  --provision-pty LINK    create a pty for provisioning, symlink its terminal at LINK\n"
          "  --slots N               concurrent tasks, the instance pool size [4]\n"
          "  --heartbeat SECONDS     heartbeat interval [10]\n"
          "  --metrics SECONDS       metrics interval, 0 for none [30]\n"
          "  --max-module-bytes N    largest module accepted [1048576]\n"
          "  --max-message-bytes N   largest MQTT message taken whole [2097152]\n"
          "  --stack-bytes N         wasm stack of a call [524288]\n"
          "  --max-memory-bytes N    linear memory cap of an instance [67108864]\n"
          "  --default-timeout S     time limit of tasks without one, 0 for none [600]\n"
          "  --fetch-retry-ms N      re-request missing chunks after this long [2000]\n"
          "  --log-level LEVEL       error, warn, info or debug [info]\n"
          "  --trusted-keys PATHS    ':'-separated Ed25519 public keys (PEM): only modules whose\n"
          "                          digest the manager signed with one of them run\n"
          "                          [$PROPLET_TRUSTED_KEYS, else the settings' trusted_keys]\n"
          "  --bench                 run the resident-instance benchmark and exit\n",
          out);
}

static bool set_override(options_t *o, const char *key, const char *value)
{
    const settings_key_t *k = settings_find(key);
    if (strlen(value) >= k->size) {
        fprintf(stderr, "embedded-proplet: the value of %s is longer than %zu bytes\n", key,
                k->size - 1);
        return false;
    }
    memcpy(settings_value(&o->overrides, k), value, strlen(value) + 1);
    return true;
}

static bool parse_args(int argc, char **argv, options_t *o)
{
    static const struct option longs[] = {
        {"broker", required_argument, NULL, 'b'},       {"id", required_argument, NULL, 'i'},
        {"domain", required_argument, NULL, 'd'},       {"channel", required_argument, NULL, 'c'},
        {"username", required_argument, NULL, 'u'},     {"password", required_argument, NULL, 'p'},
        {"settings", required_argument, NULL, 's'},     {"provision-tty", required_argument, NULL, 't'},
        {"provision-pty", required_argument, NULL, 'P'}, {"slots", required_argument, NULL, 'n'},
        {"heartbeat", required_argument, NULL, 'H'},    {"metrics", required_argument, NULL, 'M'},
        {"max-module-bytes", required_argument, NULL, 'm'},
        {"max-message-bytes", required_argument, NULL, 'x'},
        {"stack-bytes", required_argument, NULL, 'k'},  {"max-memory-bytes", required_argument, NULL, 'y'},
        {"default-timeout", required_argument, NULL, 'T'},
        {"fetch-retry-ms", required_argument, NULL, 'r'},
        {"log-level", required_argument, NULL, 'l'},    {"bench", no_argument, NULL, 'B'},
        {"trusted-keys", required_argument, NULL, 'K'},
        {"help", no_argument, NULL, 'h'},               {NULL, 0, NULL, 0},
    };
    int opt;
    while ((opt = getopt_long(argc, argv, "h", longs, NULL)) != -1) {
        bool ok = true;
        switch (opt) {
        case 'b': ok = set_override(o, "mqtt_url", optarg); break;
        case 'i': ok = set_override(o, "proplet_id", optarg); break;
        case 'd': ok = set_override(o, "domain", optarg); break;
        case 'c': ok = set_override(o, "channel", optarg); break;
        case 'u': ok = set_override(o, "mqtt_user", optarg); break;
        case 'p': ok = set_override(o, "mqtt_pass", optarg); break;
        case 's': o->settings_path = optarg; break;
        case 't': o->provision_tty = optarg; break;
        case 'P': o->provision_pty = optarg; break;
        case 'n': o->slots = (unsigned)strtoul(optarg, NULL, 10); break;
        case 'H': o->heartbeat_s = strtod(optarg, NULL); break;
        case 'M': o->metrics_s = strtod(optarg, NULL); break;
        case 'm': o->max_module_bytes = (size_t)strtoull(optarg, NULL, 10); break;
        case 'x': o->max_message_bytes = (size_t)strtoull(optarg, NULL, 10); break;
        case 'k': o->stack_bytes = (uint32_t)strtoul(optarg, NULL, 10); break;
        case 'y': o->max_memory_bytes = strtoull(optarg, NULL, 10); break;
        case 'T': o->default_timeout_s = strtod(optarg, NULL); break;
        case 'r': o->fetch_retry_ms = (uint32_t)strtoul(optarg, NULL, 10); break;
        case 'l':
            if (strcmp(optarg, "error") == 0) o->log_level = PROPLET_LOG_ERROR;
            else if (strcmp(optarg, "warn") == 0) o->log_level = PROPLET_LOG_WARN;
            else if (strcmp(optarg, "info") == 0) o->log_level = PROPLET_LOG_INFO;
            else if (strcmp(optarg, "debug") == 0) o->log_level = PROPLET_LOG_DEBUG;
            else ok = false;
            break;
        case 'B': o->bench = true; break;
        case 'K': o->trusted_key_files = optarg; break;
        case 'h': usage(stdout); exit(0);
        default: ok = false; break;
        }
        if (!ok) {
            usage(stderr);
            return false;
        }
    }
    if (optind < argc || o->slots == 0 || o->slots > PROPLET_MAX_SLOTS || o->heartbeat_s <= 0) {
        fprintf(stderr, "embedded-proplet: --slots must be 1..%d and --heartbeat positive\n",
                PROPLET_MAX_SLOTS);
        return false;
    }
    if ((o->provision_tty || o->provision_pty) && o->settings_path == NULL) {
        fprintf(stderr, "embedded-proplet: provisioning needs --settings FILE to save into\n");
        return false;
    }
    return true;
}

/* The PEM files of PROPLET_TRUSTED_KEYS, with core/signing.py's refusals: a key that cannot be
 * used stops the proplet at start rather than let it run unsigned modules. */
static bool load_trusted_keys(const char *paths, trusted_keys_t *out, char *err, size_t err_len)
{
    memset(out, 0, sizeof *out);
    char list[4096];
    if (strlen(paths) >= sizeof list) {
        snprintf(err, err_len, "PROPLET_TRUSTED_KEYS is longer than %zu bytes", sizeof list - 1);
        return false;
    }
    memcpy(list, paths, strlen(paths) + 1);
    char *rest = NULL;
    for (char *path = strtok_r(list, ":", &rest); path != NULL; path = strtok_r(NULL, ":", &rest)) {
        while (*path == ' ')
            path++;
        size_t len = strlen(path);
        while (len > 0 && path[len - 1] == ' ')
            path[--len] = '\0';
        if (len == 0)
            continue;
        FILE *f = fopen(path, "r");
        if (f == NULL) {
            snprintf(err, err_len, "cannot read the trusted key %s: %s", path, strerror(errno));
            return false;
        }
        /* An Ed25519 public key's PEM is 113 bytes; a file this large is something else. */
        char pem[2048];
        size_t n = fread(pem, 1, sizeof pem, f);
        bool unreadable = ferror(f) != 0;
        int error = errno;
        fclose(f);
        if (unreadable) {
            snprintf(err, err_len, "cannot read the trusted key %s: %s", path, strerror(error));
            return false;
        }
        uint8_t key[ED25519_PUBLIC_KEY_BYTES];
        if (n == sizeof pem || !trusted_key_parse_pem(pem, n, key)) {
            snprintf(err, err_len, "%s is not an Ed25519 public key (a PEM file as `propeller keys "
                                   "generate` writes them)", path);
            return false;
        }
        if (!trusted_keys_add(out, key)) {
            snprintf(err, err_len, "PROPLET_TRUSTED_KEYS names more than %d keys; this proplet "
                                   "holds at most %d", PROPLET_TRUSTED_KEYS_MAX,
                     PROPLET_TRUSTED_KEYS_MAX);
            return false;
        }
    }
    return true;
}

/* Settings file first, then the command line; domain and channel default like the manager's. */
static void current_settings(const options_t *o, proplet_settings_t *out)
{
    memset(out, 0, sizeof *out);
    if (o->settings_path != NULL)
        settings_load(o->settings_path, out);
    proplet_settings_t overrides = o->overrides;
    for (size_t i = 0; i < settings_key_count; i++) {
        const char *v = settings_value(&overrides, &settings_keys[i]);
        if (v[0] != '\0')
            memcpy(settings_value(out, &settings_keys[i]), v, strlen(v) + 1);
    }
    if (out->domain[0] == '\0')
        memcpy(out->domain, "propeller", sizeof "propeller");
    if (out->channel[0] == '\0')
        memcpy(out->channel, "default", sizeof "default");
}

typedef struct {
    host_t *host;
    proplet_t *proplet;
    int *stopping;
} worker_t;

static void *work(void *arg)
{
    worker_t *w = arg;
    host_t *host = w->host;
    engine_thread_begin();
    for (;;) {
        while (proplet_run_next(w->proplet)) {
        }
        pthread_mutex_lock(&host->lock);
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += 1;
        while (host->pending_work == 0 && !*w->stopping)
            if (pthread_cond_timedwait(&host->work, &host->lock, &deadline) != 0)
                break;
        if (host->pending_work > 0)
            host->pending_work--;
        bool stopping = *w->stopping;
        pthread_mutex_unlock(&host->lock);
        if (stopping)
            break;
    }
    engine_thread_end();
    return NULL;
}

static uint64_t memory_total(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    unsigned long long kb = 0;
    if (f != NULL) {
        if (fscanf(f, "MemTotal: %llu", &kb) != 1)
            kb = 0;
        fclose(f);
    }
    return kb * 1024u;
}

/* Join the network with these settings until a signal or a provisioning REBOOT. */
static bool run(const options_t *o, const proplet_settings_t *s, provision_tty_t *tty)
{
    static proplet_t proplet;
    static char hostname[65];
    static struct utsname machine;
    gethostname(hostname, sizeof hostname - 1);
    uname(&machine);

    host_t host;
    host_init(&host, o->log_level);
    proplet_port_t port = host_port(&host);
    proplet_config_t cfg = {
        .slots = o->slots,
        .max_module_bytes = o->max_module_bytes,
        .stack_bytes = o->stack_bytes,
        .max_memory_bytes = o->max_memory_bytes,
        .heartbeat_ms = (uint32_t)(o->heartbeat_s * 1000.0),
        .metrics_ms = (uint32_t)(o->metrics_s * 1000.0),
        .default_timeout_ms = (uint32_t)(o->default_timeout_s * 1000.0),
        .fetch_retry_ms = o->fetch_retry_ms,
        .fetch_retries = 5,
        .cpu_mhz = 0,
        .description = "Propeller embedded proplet (host build)",
        .os = "linux",
        .hostname = hostname,
        .cpu_arch = machine.machine,
        .total_memory_bytes = memory_total(),
    };
    memcpy(cfg.proplet_id, s->proplet_id, sizeof cfg.proplet_id);
    memcpy(cfg.domain, s->domain, sizeof cfg.domain);
    memcpy(cfg.channel, s->channel, sizeof cfg.channel);
    char err[300] = "";
    if (o->trusted_keys.count > 0) {
        cfg.trusted_keys = o->trusted_keys;
    } else if (!trusted_keys_parse(s->trusted_keys, &cfg.trusted_keys, err, sizeof err)) {
        host_log(PROPLET_LOG_ERROR, "the settings' trusted_keys cannot be used: %s", err);
        host_destroy(&host);
        return false;
    }
    if (!proplet_init(&proplet, &cfg, &port, err, sizeof err)) {
        host_log(PROPLET_LOG_ERROR, "%s", err);
        host_destroy(&host);
        return false;
    }
    mqtt_options_t mo = {s->mqtt_url, s->proplet_id, s->mqtt_user, s->mqtt_pass, 30,
                         o->max_message_bytes};
    host.mqtt = mqtt_open(&mo, &proplet, err, sizeof err);
    if (host.mqtt == NULL) {
        host_log(PROPLET_LOG_ERROR, "%s", err);
        host_destroy(&host);
        return false;
    }
    host_log(PROPLET_LOG_INFO, "proplet %s joining %s on m/%s/c/%s/ with %u slots",
             s->proplet_id, s->mqtt_url, s->domain, s->channel, o->slots);
    if (cfg.trusted_keys.count > 0)
        host_log(PROPLET_LOG_INFO, "only modules signed by one of %zu trusted keys run",
                 cfg.trusted_keys.count);

    int stopping = 0;
    pthread_t threads[PROPLET_MAX_SLOTS];
    worker_t workers[PROPLET_MAX_SLOTS];
    unsigned started = 0;
    for (; started < o->slots; started++) {
        workers[started] = (worker_t){&host, &proplet, &stopping};
        if (pthread_create(&threads[started], NULL, work, &workers[started]) != 0)
            break;
    }

    bool reboot = false;
    while (!stop_requested && !reboot) {
        proplet_tick(&proplet);
        mqtt_poll(host.mqtt);
        if (tty != NULL) {
            reboot = provision_tty_wait_reboot(tty, 100);
        } else {
            struct timespec pause = {0, 100 * 1000000L};
            nanosleep(&pause, NULL);
        }
    }
    host_log(PROPLET_LOG_INFO, "%s", reboot ? "rebooting with the provisioned settings"
                                            : "shutting down");
    proplet_shutdown(&proplet);
    pthread_mutex_lock(&host.lock);
    stopping = 1;
    pthread_cond_broadcast(&host.work);
    pthread_mutex_unlock(&host.lock);
    for (unsigned i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    mqtt_close(host.mqtt);
    host.mqtt = NULL;
    proplet_destroy(&proplet);
    host_destroy(&host);
    return reboot;
}

static uint64_t bench_cpu_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

static int bench(const options_t *o)
{
    const char *kinds[] = {"cpu", "mem"};
    for (size_t i = 0; i < 2; i++) {
        bench_result_t r;
        char err[300];
        bench_options_t options = {BENCH_MAX_INSTANCES, o->stack_bytes, 0, bench_cpu_us, NULL};
        if (!bench_run(kinds[i], &options, &r, err, sizeof err)) {
            fprintf(stderr, "benchmark %s failed: %s\n", kinds[i], err);
            return 1;
        }
        char line[512];
        if (bench_format(&r, line, sizeof line) == 0)
            return 1;
        printf("BENCH %s\n", line);
    }
    return 0;
}

int main(int argc, char **argv)
{
    options_t o = {
        .slots = 4,
        .heartbeat_s = 10,
        .metrics_s = 30,
        .max_module_bytes = 1024 * 1024,
        .max_message_bytes = 2 * 1024 * 1024,
        .stack_bytes = 512 * 1024,
        .max_memory_bytes = 64 * 1024 * 1024,
        .default_timeout_s = 600,
        .fetch_retry_ms = 2000,
        .log_level = PROPLET_LOG_INFO,
    };
    if (!parse_args(argc, argv, &o))
        return 2;
    host_set_log_level(o.log_level);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (o.trusted_key_files == NULL)
        o.trusted_key_files = getenv("PROPLET_TRUSTED_KEYS");
    char key_err[600] = "";
    if (o.trusted_key_files != NULL
        && !load_trusted_keys(o.trusted_key_files, &o.trusted_keys, key_err, sizeof key_err)) {
        host_log(PROPLET_LOG_ERROR, "%s", key_err);
        return 2;
    }

    engine_config_t engine_cfg = {0, o.stack_bytes};
    char err[300] = "";
    if (!engine_init(&engine_cfg, err, sizeof err)) {
        host_log(PROPLET_LOG_ERROR, "%s", err);
        return 1;
    }
    if (o.bench) {
        int rc = bench(&o);
        engine_shutdown();
        return rc;
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    provision_tty_t *tty = NULL;
    if (o.provision_pty != NULL)
        tty = provision_pty_start(o.provision_pty, o.settings_path, err, sizeof err);
    else if (o.provision_tty != NULL)
        tty = provision_tty_start(o.provision_tty, o.settings_path, err, sizeof err);
    if ((o.provision_pty != NULL || o.provision_tty != NULL) && tty == NULL) {
        host_log(PROPLET_LOG_ERROR, "%s", err);
        engine_shutdown();
        return 1;
    }

    int rc = 0;
    while (!stop_requested) {
        proplet_settings_t s;
        current_settings(&o, &s);
        const char *missing = NULL;
        if (!settings_ready(&s, false, &missing)) {
            if (tty == NULL) {
                host_log(PROPLET_LOG_ERROR,
                         "not configured: %s is missing; pass it on the command line or "
                         "provision with --settings and --provision-pty",
                         missing);
                rc = 2;
                break;
            }
            host_log(PROPLET_LOG_INFO,
                     "waiting for provisioning: %s is missing (propeller firmware provision "
                     "--port %s)",
                     missing, o.provision_pty != NULL ? o.provision_pty : o.provision_tty);
            while (!stop_requested && !provision_tty_wait_reboot(tty, 200)) {
            }
            continue;
        }
        if (!run(&o, &s, tty)) {
            if (stop_requested)
                break;
            if (tty == NULL) {
                rc = 1;
                break;
            }
            /* Like a device: stay reachable on the provisioning port to fix the settings. */
            host_log(PROPLET_LOG_ERROR, "cannot start with these settings; provision them again");
            while (!stop_requested && !provision_tty_wait_reboot(tty, 200)) {
            }
        }
    }
    provision_tty_stop(tty);
    engine_shutdown();
    return rc;
}
