/* MQTT for the host proplet: paho.mqtt.c's asynchronous client (Debian libpaho-mqtt-dev).
 *
 * QoS 1 everywhere, clean session, the Last Will from the core, and after every (re)connect the
 * subscriptions again and a fresh announcement. Paho reconnects by itself after a lost
 * connection; until the first connection succeeds, mqtt_poll() retries with backoff.
 * Publishes made while disconnected are buffered by paho (bounded: MAX_BUFFERED, the newest
 * is refused beyond it).
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <MQTTAsync.h>

#include "host.h"

#define MAX_BUFFERED 256
#define OVERSIZED_HEAD 256
#define OVERSIZED_TAIL 768
#define FIRST_RETRY_MS 1000
#define MAX_RETRY_MS 30000

struct mqtt_link {
    MQTTAsync client;
    proplet_t *proplet;
    size_t max_message_bytes;
    char url[160];
    char username[65];
    char password[129];
    int keepalive_s;
    char will_topic[PROPLET_TOPIC_MAX + 1];
    char will_payload[256];
    pthread_mutex_t state_lock;
    bool connecting;
    bool connected;
    bool ever_connected;
    uint64_t next_attempt_ms;
    uint32_t retry_ms;
};

static void set_state(mqtt_link_t *link, bool connecting, bool connected)
{
    pthread_mutex_lock(&link->state_lock);
    link->connecting = connecting;
    link->connected = connected;
    if (connected)
        link->ever_connected = true;
    pthread_mutex_unlock(&link->state_lock);
}

bool mqtt_connected(mqtt_link_t *link)
{
    pthread_mutex_lock(&link->state_lock);
    bool connected = link->connected;
    pthread_mutex_unlock(&link->state_lock);
    return connected;
}

static void on_subscribed(void *context, MQTTAsync_successData *response)
{
    (void)response;
    mqtt_link_t *link = context;
    host_log(PROPLET_LOG_INFO, "connected to %s and subscribed", link->url);
    proplet_on_connected(link->proplet);
}

static void on_subscribe_failed(void *context, MQTTAsync_failureData *response)
{
    mqtt_link_t *link = context;
    host_log(PROPLET_LOG_ERROR,
             "subscribing on %s failed (code %d); the broker may refuse these topics for this "
             "client's credentials",
             link->url, response != NULL ? response->code : 0);
}

/* Called by paho after the first connect and after every automatic reconnect. */
static void on_connected(void *context, char *cause)
{
    (void)cause;
    mqtt_link_t *link = context;
    set_state(link, false, true);
    char topics[PROPLET_SUBSCRIPTION_COUNT][PROPLET_TOPIC_MAX + 1];
    char *names[PROPLET_SUBSCRIPTION_COUNT];
    int qos[PROPLET_SUBSCRIPTION_COUNT];
    const size_t n = PROPLET_SUBSCRIPTION_COUNT;
    for (size_t i = 0; i < n; i++) {
        proplet_topic(link->proplet, proplet_subscriptions[i], topics[i], sizeof topics[i]);
        names[i] = topics[i];
        qos[i] = 1;
    }
    MQTTAsync_responseOptions opts = MQTTAsync_responseOptions_initializer;
    opts.onSuccess = on_subscribed;
    opts.onFailure = on_subscribe_failed;
    opts.context = link;
    int rc = MQTTAsync_subscribeMany(link->client, (int)n, names, qos, &opts);
    if (rc != MQTTASYNC_SUCCESS)
        host_log(PROPLET_LOG_ERROR, "subscribing failed to start (code %d)", rc);
}

static void on_connect_failed(void *context, MQTTAsync_failureData *response)
{
    mqtt_link_t *link = context;
    set_state(link, false, false);
    host_log(PROPLET_LOG_WARN,
             "cannot reach the MQTT broker at %s (%s, code %d); retrying in %u ms. Start the "
             "broker there or provision another mqtt_url",
             link->url,
             response != NULL && response->message != NULL ? response->message : "no answer",
             response != NULL ? response->code : 0, (unsigned)link->retry_ms);
}

static void on_connection_lost(void *context, char *cause)
{
    mqtt_link_t *link = context;
    set_state(link, false, false);
    proplet_on_disconnected(link->proplet);
    host_log(PROPLET_LOG_WARN, "lost the connection to %s (%s); reconnecting", link->url,
             cause != NULL ? cause : "closed by the broker");
}

static int on_message(void *context, char *topic, int topic_len, MQTTAsync_message *message)
{
    mqtt_link_t *link = context;
    size_t tlen = topic_len > 0 ? (size_t)topic_len : strlen(topic);
    size_t len = message->payloadlen > 0 ? (size_t)message->payloadlen : 0;
    const char *payload = message->payload;
    if (len > link->max_message_bytes) {
        size_t head = len < OVERSIZED_HEAD ? len : OVERSIZED_HEAD;
        size_t tail = len < OVERSIZED_TAIL ? len : OVERSIZED_TAIL;
        proplet_on_oversized_message(link->proplet, topic, tlen, payload, head,
                                     payload + len - tail, tail, len);
    } else {
        proplet_on_message(link->proplet, topic, tlen, payload, len);
    }
    MQTTAsync_freeMessage(&message);
    MQTTAsync_free(topic);
    return 1;
}

static void start_connect(mqtt_link_t *link)
{
    MQTTAsync_willOptions will = MQTTAsync_willOptions_initializer;
    will.topicName = link->will_topic;
    will.message = link->will_payload;
    will.qos = 1;
    will.retained = 0;
    MQTTAsync_connectOptions opts = MQTTAsync_connectOptions_initializer;
    opts.keepAliveInterval = link->keepalive_s;
    opts.cleansession = 1;
    opts.will = &will;
    /* MQTT 3.1.1 allows a password only together with a user name. */
    opts.username = link->username[0] != '\0' ? link->username : NULL;
    opts.password = opts.username != NULL && link->password[0] != '\0' ? link->password : NULL;
    opts.connectTimeout = 10;
    opts.automaticReconnect = 1;
    opts.minRetryInterval = 1;
    opts.maxRetryInterval = MAX_RETRY_MS / 1000;
    opts.onFailure = on_connect_failed;
    opts.context = link;
    set_state(link, true, false);
    int rc = MQTTAsync_connect(link->client, &opts);
    if (rc != MQTTASYNC_SUCCESS) {
        set_state(link, false, false);
        host_log(PROPLET_LOG_WARN, "connecting to %s failed to start (code %d)", link->url, rc);
    }
}

/* paho speaks tcp:// and ssl://; the project's URLs say mqtt:// and mqtts://. */
static bool paho_url(const char *url, char *out, size_t len, char *err, size_t err_len)
{
    const char *rest;
    if (strncmp(url, "mqtt://", 7) == 0)
        rest = url + 7;
    else if (strncmp(url, "tcp://", 6) == 0)
        rest = url + 6;
    else if (strncmp(url, "mqtts://", 8) == 0 || strncmp(url, "ssl://", 6) == 0) {
        snprintf(err, err_len,
                 "the host build speaks plain MQTT only; use mqtt://host:port (the device "
                 "build takes mqtts://)");
        return false;
    } else {
        snprintf(err, err_len, "the broker URL must look like mqtt://host:port, got '%s'", url);
        return false;
    }
    int n = snprintf(out, len, "tcp://%s%s", rest, strchr(rest, ':') != NULL ? "" : ":1883");
    return n > 0 && (size_t)n < len;
}

mqtt_link_t *mqtt_open(const mqtt_options_t *options, proplet_t *proplet, char *err,
                       size_t err_len)
{
    mqtt_link_t *link = calloc(1, sizeof *link);
    if (link == NULL) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    link->proplet = proplet;
    link->max_message_bytes = options->max_message_bytes;
    link->keepalive_s = options->keepalive_s;
    link->retry_ms = FIRST_RETRY_MS;
    snprintf(link->username, sizeof link->username, "%s", options->username ? options->username : "");
    snprintf(link->password, sizeof link->password, "%s", options->password ? options->password : "");
    pthread_mutex_init(&link->state_lock, NULL);
    if (link->username[0] == '\0' && link->password[0] != '\0')
        host_log(PROPLET_LOG_WARN, "an MQTT password without a user name is not sent (MQTT 3.1.1 "
                                   "forbids it); provision mqtt_user as well");
    size_t will_len = 0;
    if (!paho_url(options->url, link->url, sizeof link->url, err, err_len)
        || !proplet_last_will(proplet, link->will_topic, sizeof link->will_topic,
                              link->will_payload, sizeof link->will_payload, &will_len)) {
        if (err[0] == '\0')
            snprintf(err, err_len, "the Last Will does not fit");
        pthread_mutex_destroy(&link->state_lock);
        free(link);
        return NULL;
    }
    MQTTAsync_createOptions create = MQTTAsync_createOptions_initializer;
    create.sendWhileDisconnected = 1;
    create.maxBufferedMessages = MAX_BUFFERED;
    int rc = MQTTAsync_createWithOptions(&link->client, link->url, options->client_id,
                                         MQTTCLIENT_PERSISTENCE_NONE, NULL, &create);
    if (rc == MQTTASYNC_SUCCESS)
        rc = MQTTAsync_setCallbacks(link->client, link, on_connection_lost, on_message, NULL);
    if (rc == MQTTASYNC_SUCCESS)
        rc = MQTTAsync_setConnected(link->client, link, on_connected);
    if (rc != MQTTASYNC_SUCCESS) {
        snprintf(err, err_len, "could not create the MQTT client for %s (code %d)", link->url, rc);
        if (link->client != NULL)
            MQTTAsync_destroy(&link->client);
        pthread_mutex_destroy(&link->state_lock);
        free(link);
        return NULL;
    }
    start_connect(link);
    link->next_attempt_ms = host_now_ms() + link->retry_ms;
    return link;
}

void mqtt_poll(mqtt_link_t *link)
{
    pthread_mutex_lock(&link->state_lock);
    bool retry = !link->ever_connected && !link->connecting && host_now_ms() >= link->next_attempt_ms;
    pthread_mutex_unlock(&link->state_lock);
    if (!retry)
        return;
    link->retry_ms = link->retry_ms * 2 > MAX_RETRY_MS ? MAX_RETRY_MS : link->retry_ms * 2;
    link->next_attempt_ms = host_now_ms() + link->retry_ms;
    start_connect(link);
}

bool mqtt_publish(mqtt_link_t *link, const char *topic, const char *payload, size_t len)
{
    MQTTAsync_responseOptions opts = MQTTAsync_responseOptions_initializer;
    return MQTTAsync_send(link->client, topic, (int)len, payload, 1, 0, &opts) == MQTTASYNC_SUCCESS;
}

void mqtt_close(mqtt_link_t *link)
{
    if (link == NULL)
        return;
    if (mqtt_connected(link)) {
        /* A clean disconnect: the broker drops the Last Will, and the manager sees the
         * proplet go quiet instead of "offline"; publish offline ourselves first. */
        size_t len = strlen(link->will_payload);
        mqtt_publish(link, link->will_topic, link->will_payload, len);
        MQTTAsync_disconnectOptions opts = MQTTAsync_disconnectOptions_initializer;
        opts.timeout = 2000;
        MQTTAsync_disconnect(link->client, &opts);
        for (int i = 0; i < 40 && MQTTAsync_isConnected(link->client); i++) {
            struct timespec pause = {0, 50 * 1000000L};
            nanosleep(&pause, NULL);
        }
    }
    MQTTAsync_destroy(&link->client);
    pthread_mutex_destroy(&link->state_lock);
    free(link);
}
