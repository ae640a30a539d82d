#define _DEFAULT_SOURCE /* getifaddrs, gmtime_r, clock_gettime */

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "host.h"

static int log_level = PROPLET_LOG_INFO;

void host_set_log_level(int level)
{
    log_level = level;
}

static void vlog(int level, const char *fmt, va_list args)
{
    if (level > log_level)
        return;
    static const char *const names[] = {"ERROR", "WARN", "INFO", "DEBUG"};
    char line[768];
    struct timespec now;
    struct tm utc;
    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &utc);
    int n = (int)strftime(line, sizeof line, "%Y-%m-%dT%H:%M:%S", &utc);
    n += snprintf(line + n, sizeof line - (size_t)n, ".%03ldZ %-5s ", now.tv_nsec / 1000000L,
                  names[level < 0 ? 0 : level > 3 ? 3 : level]);
    vsnprintf(line + n, sizeof line - (size_t)n, fmt, args);
    /* One write per line, so lines of concurrent threads do not interleave. */
    fprintf(stderr, "%s\n", line);
    fflush(stderr);
}

void host_log(int level, const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    vlog(level, fmt, args);
    va_end(args);
}

uint64_t host_now_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000u + (uint64_t)now.tv_nsec / 1000000u;
}

void host_init(host_t *host, int level)
{
    memset(host, 0, sizeof *host);
    pthread_mutex_init(&host->lock, NULL);
    pthread_cond_init(&host->work, NULL);
    host->log_level = level;
    log_level = level;
}

void host_destroy(host_t *host)
{
    pthread_cond_destroy(&host->work);
    pthread_mutex_destroy(&host->lock);
}

static void port_lock(void *ctx)
{
    pthread_mutex_lock(&((host_t *)ctx)->lock);
}

static void port_unlock(void *ctx)
{
    pthread_mutex_unlock(&((host_t *)ctx)->lock);
}

static void port_wake(void *ctx)
{
    host_t *host = ctx;
    pthread_mutex_lock(&host->lock);
    host->pending_work++;
    pthread_cond_signal(&host->work);
    pthread_mutex_unlock(&host->lock);
}

static bool port_publish(void *ctx, const char *topic, const char *payload, size_t len)
{
    host_t *host = ctx;
    return host->mqtt != NULL && mqtt_publish(host->mqtt, topic, payload, len);
}

static uint64_t port_now_ms(void *ctx)
{
    (void)ctx;
    return host_now_ms();
}

static bool port_wall_clock(void *ctx, char *out, size_t len)
{
    (void)ctx;
    struct timespec now;
    struct tm utc;
    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &utc);
    size_t n = strftime(out, len, "%Y-%m-%dT%H:%M:%S", &utc);
    return n > 0 && snprintf(out + n, len - n, ".%03ldZ", now.tv_nsec / 1000000L) > 0;
}

static uint64_t port_thread_cpu_us(void *ctx)
{
    (void)ctx;
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

static uint64_t meminfo_kb(const char *key)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (f == NULL)
        return 0;
    char line[128];
    unsigned long long kb = 0;
    size_t key_len = strlen(key);
    while (fgets(line, sizeof line, f) != NULL)
        if (strncmp(line, key, key_len) == 0 && sscanf(line + key_len, " %llu", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

static void port_sample(void *ctx, proplet_sample_t *out)
{
    (void)ctx;
    static uint64_t last_wall_us, last_cpu_us;
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    out->cpu_user_seconds = (double)usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6;
    out->cpu_system_seconds = (double)usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6;
    uint64_t cpu_us = (uint64_t)((out->cpu_user_seconds + out->cpu_system_seconds) * 1e6);
    uint64_t wall_us = host_now_ms() * 1000u;
    if (last_wall_us > 0 && wall_us > last_wall_us)
        out->cpu_percent = 100.0 * (double)(cpu_us - last_cpu_us) / (double)(wall_us - last_wall_us);
    last_wall_us = wall_us;
    last_cpu_us = cpu_us;

    FILE *statm = fopen("/proc/self/statm", "r");
    unsigned long long pages = 0, resident = 0;
    if (statm != NULL) {
        if (fscanf(statm, "%llu %llu", &pages, &resident) != 2)
            resident = 0;
        fclose(statm);
    }
    out->rss_bytes = resident * (uint64_t)sysconf(_SC_PAGESIZE);
    /* The host has no heap of its own to report: the system's memory stands in for it. */
    out->heap_total_bytes = meminfo_kb("MemTotal:") * 1024u;
    out->heap_free_bytes = meminfo_kb("MemAvailable:") * 1024u;
    out->heap_largest_free_block = out->heap_free_bytes;
    out->heap_min_free_bytes = 0;
}

static void port_network_address(void *ctx, char *out, size_t len)
{
    (void)ctx;
    out[0] = '\0';
    struct ifaddrs *list;
    if (getifaddrs(&list) != 0)
        return;
    for (struct ifaddrs *it = list; it != NULL; it = it->ifa_next) {
        if (it->ifa_addr == NULL || it->ifa_addr->sa_family != AF_INET)
            continue;
        const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)it->ifa_addr;
        if (ntohl(in->sin_addr.s_addr) >> 24 == 127)
            continue;
        inet_ntop(AF_INET, &in->sin_addr, out, (socklen_t)len);
        break;
    }
    freeifaddrs(list);
}

static void port_log(void *ctx, int level, const char *message)
{
    (void)ctx;
    host_log(level, "%s", message);
}

proplet_port_t host_port(host_t *host)
{
    proplet_port_t port = {
        .ctx = host,
        .publish = port_publish,
        .lock = port_lock,
        .unlock = port_unlock,
        .wake_worker = port_wake,
        .now_ms = port_now_ms,
        .wall_clock = port_wall_clock,
        .thread_cpu_us = port_thread_cpu_us,
        .sample = port_sample,
        .network_address = port_network_address,
        .log = port_log,
    };
    return port;
}
