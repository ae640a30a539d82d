/* The POSIX port of the embedded proplet: the pieces main.c wires together. */
#ifndef PROPLET_HOST_H
#define PROPLET_HOST_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../../core/proplet.h"
#include "../../core/provision.h"

/* ---- system.c: locks, clocks, samples and logging for the core ---- */

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t work;     /* a task became ready */
    unsigned pending_work;   /* wake-ups not yet taken by a worker (guarded by lock) */
    int log_level;           /* PROPLET_LOG_* and below are printed */
    struct mqtt_link *mqtt;  /* publish target */
} host_t;

void host_init(host_t *host, int log_level);
void host_destroy(host_t *host);
proplet_port_t host_port(host_t *host);
void host_log(int level, const char *fmt, ...);
void host_set_log_level(int level);
uint64_t host_now_ms(void);

/* ---- mqtt.c: paho MQTT C (async) with reconnect, re-subscribe and a Last Will ---- */

typedef struct mqtt_link mqtt_link_t;

typedef struct {
    const char *url;       /* mqtt://host:port (also tcp://, mqtts://, ssl://) */
    const char *client_id;
    const char *username;  /* NULL or "" for none */
    const char *password;
    int keepalive_s;
    size_t max_message_bytes; /* larger messages take the core's oversized path */
} mqtt_options_t;

mqtt_link_t *mqtt_open(const mqtt_options_t *options, proplet_t *proplet, char *err,
                       size_t err_len);
/* Keep trying to connect while the first connection has not succeeded (paho reconnects by
 * itself only after a connection was established). Call from the timer loop. */
void mqtt_poll(mqtt_link_t *link);
bool mqtt_publish(mqtt_link_t *link, const char *topic, const char *payload, size_t len);
bool mqtt_connected(mqtt_link_t *link);
void mqtt_close(mqtt_link_t *link);

/* ---- provision_tty.c: the serial line protocol on a tty or pty, settings in a file ---- */

bool settings_load(const char *path, proplet_settings_t *settings);
bool settings_save(const char *path, const proplet_settings_t *settings, char *err, size_t err_len);

typedef struct provision_tty provision_tty_t;

/* Serve the line protocol on the tty at path; settings are kept in settings_path. */
provision_tty_t *provision_tty_start(const char *path, const char *settings_path, char *err,
                                     size_t err_len);
/* Create a pseudo-terminal, serve the protocol on it and symlink its terminal side at link
 * (for tests and for trying the protocol without a board). */
provision_tty_t *provision_pty_start(const char *link, const char *settings_path, char *err,
                                     size_t err_len);
/* Wait up to timeout_ms for a REBOOT command; true when one came (and clears it). */
bool provision_tty_wait_reboot(provision_tty_t *tty, unsigned timeout_ms);
void provision_tty_stop(provision_tty_t *tty);

#endif
