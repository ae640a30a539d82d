/* Wi-Fi (station, reconnecting forever) and MQTT (esp-mqtt: QoS 1, Last Will, automatic
 * reconnect, re-subscribe on every connect). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "esp_crt_bundle.h"
#include "esp_event.h"
#include "esp_log.h"
#include "esp_netif.h"
#include "esp_sntp.h"
#include "esp_wifi.h"
#include "mqtt_client.h"

#include "device.h"

#define RX_HEAD 256
#define RX_TAIL 768

static const char *TAG = "net";

static char ip_text[16];
static esp_mqtt_client_handle_t client;
static proplet_t *mqtt_proplet;
static char will_topic[PROPLET_TOPIC_MAX + 1];
static char will_payload[256];

/* Reassembly of messages esp-mqtt delivers in pieces (larger than its buffer). */
static char *rx_buf;
static char rx_topic[PROPLET_TOPIC_MAX + 1];
static size_t rx_topic_len;
static size_t rx_total;
static bool rx_oversized;
static char rx_head[RX_HEAD];
static char rx_tail[RX_TAIL];

static void on_wifi(void *arg, esp_event_base_t base, int32_t id, void *data)
{
    (void)arg;
    if (base == WIFI_EVENT && id == WIFI_EVENT_STA_START) {
        esp_wifi_connect();
    } else if (base == WIFI_EVENT && id == WIFI_EVENT_STA_DISCONNECTED) {
        /* Retry forever; the driver paces the attempts (upstream's device gave up: defect 50). */
        ip_text[0] = '\0';
        ESP_LOGW(TAG, "Wi-Fi disconnected; reconnecting");
        esp_wifi_connect();
    } else if (base == IP_EVENT && id == IP_EVENT_STA_GOT_IP) {
        const ip_event_got_ip_t *got = data;
        snprintf(ip_text, sizeof ip_text, IPSTR, IP2STR(&got->ip_info.ip));
        ESP_LOGI(TAG, "Wi-Fi up, address %s", ip_text);
    }
}

bool wifi_address(char *out, size_t len)
{
    snprintf(out, len, "%s", ip_text);
    return ip_text[0] != '\0';
}

void wifi_start(const proplet_settings_t *settings)
{
    ESP_ERROR_CHECK(esp_netif_init());
    ESP_ERROR_CHECK(esp_event_loop_create_default());
    esp_netif_create_default_wifi_sta();
    wifi_init_config_t init = WIFI_INIT_CONFIG_DEFAULT();
    ESP_ERROR_CHECK(esp_wifi_init(&init));
    ESP_ERROR_CHECK(esp_event_handler_instance_register(WIFI_EVENT, ESP_EVENT_ANY_ID, on_wifi, NULL, NULL));
    ESP_ERROR_CHECK(esp_event_handler_instance_register(IP_EVENT, IP_EVENT_STA_GOT_IP, on_wifi, NULL, NULL));
    wifi_config_t config;
    memset(&config, 0, sizeof config);
    snprintf((char *)config.sta.ssid, sizeof config.sta.ssid, "%s", settings->wifi_ssid);
    snprintf((char *)config.sta.password, sizeof config.sta.password, "%s", settings->wifi_pass);
    ESP_ERROR_CHECK(esp_wifi_set_mode(WIFI_MODE_STA));
    ESP_ERROR_CHECK(esp_wifi_set_config(WIFI_IF_STA, &config));
    ESP_ERROR_CHECK(esp_wifi_start());
    /* Modem sleep delays incoming messages by up to a beacon interval; tasks arrive over MQTT. */
    esp_wifi_set_ps(WIFI_PS_NONE);
    /* Wall-clock time for metrics timestamps, when the network reaches an NTP server. */
    esp_sntp_setoperatingmode(ESP_SNTP_OPMODE_POLL);
    esp_sntp_setservername(0, "pool.ntp.org");
    esp_sntp_init();
}

static void deliver_piece(const esp_mqtt_event_handle_t e)
{
    if (e->current_data_offset == 0) {
        /* Only the first piece carries the topic. */
        rx_topic_len = (size_t)e->topic_len < sizeof rx_topic ? (size_t)e->topic_len : sizeof rx_topic - 1;
        memcpy(rx_topic, e->topic, rx_topic_len);
        rx_total = (size_t)e->total_data_len;
        rx_oversized = rx_total > PROPLET_DEVICE_RX_MAX;
    }
    size_t offset = (size_t)e->current_data_offset;
    size_t len = (size_t)e->data_len;
    if (offset + len > rx_total)
        return;
    if (!rx_oversized) {
        memcpy(rx_buf + offset, e->data, len);
    } else {
        /* Keep only the first and last bytes: enough to refuse the task by name. */
        for (size_t i = 0; i < len; i++) {
            size_t at = offset + i;
            if (at < RX_HEAD)
                rx_head[at] = e->data[i];
            if (at + RX_TAIL >= rx_total)
                rx_tail[at + RX_TAIL - rx_total] = e->data[i];
        }
    }
    if (offset + len < rx_total)
        return;
    if (!rx_oversized) {
        proplet_on_message(mqtt_proplet, rx_topic, rx_topic_len, rx_buf, rx_total);
    } else {
        size_t head = rx_total < RX_HEAD ? rx_total : RX_HEAD;
        proplet_on_oversized_message(mqtt_proplet, rx_topic, rx_topic_len, rx_head, head, rx_tail,
                                     RX_TAIL, rx_total);
    }
}

static void on_mqtt(void *arg, esp_event_base_t base, int32_t id, void *data)
{
    (void)arg;
    (void)base;
    esp_mqtt_event_handle_t e = data;
    switch ((esp_mqtt_event_id_t)id) {
    case MQTT_EVENT_CONNECTED:
        /* Clean session: subscribe again on every connect, then announce. */
        for (size_t i = 0; i < PROPLET_SUBSCRIPTION_COUNT; i++) {
            char topic[PROPLET_TOPIC_MAX + 1];
            if (proplet_topic(mqtt_proplet, proplet_subscriptions[i], topic, sizeof topic))
                esp_mqtt_client_subscribe_single(client, topic, 1);
        }
        ESP_LOGI(TAG, "connected to the broker and subscribed");
        proplet_on_connected(mqtt_proplet);
        break;
    case MQTT_EVENT_DISCONNECTED:
        ESP_LOGW(TAG, "disconnected from the broker; reconnecting");
        proplet_on_disconnected(mqtt_proplet);
        break;
    case MQTT_EVENT_DATA:
        deliver_piece(e);
        break;
    case MQTT_EVENT_ERROR:
        ESP_LOGW(TAG, "MQTT error (type %d); check mqtt_url and the broker's credentials",
                 e->error_handle != NULL ? (int)e->error_handle->error_type : -1);
        break;
    default:
        break;
    }
}

bool mqtt_start(const proplet_settings_t *settings, proplet_t *proplet)
{
    mqtt_proplet = proplet;
    rx_buf = malloc(PROPLET_DEVICE_RX_MAX);
    size_t will_len = 0;
    if (rx_buf == NULL || !proplet_last_will(proplet, will_topic, sizeof will_topic, will_payload,
                                             sizeof will_payload, &will_len)) {
        ESP_LOGE(TAG, "out of memory for the MQTT receive buffer");
        return false;
    }
    esp_mqtt_client_config_t config;
    memset(&config, 0, sizeof config);
    config.broker.address.uri = settings->mqtt_url;
    if (strncmp(settings->mqtt_url, "mqtts://", 8) == 0 || strncmp(settings->mqtt_url, "ssl://", 6) == 0)
        config.broker.verification.crt_bundle_attach = esp_crt_bundle_attach;
    config.credentials.client_id = settings->proplet_id;
    config.credentials.username = settings->mqtt_user[0] != '\0' ? settings->mqtt_user : NULL;
    config.credentials.authentication.password = settings->mqtt_pass[0] != '\0' ? settings->mqtt_pass : NULL;
    config.session.keepalive = 30;
    config.session.last_will.topic = will_topic;
    config.session.last_will.msg = will_payload;
    config.session.last_will.msg_len = (int)will_len;
    config.session.last_will.qos = 1;
    config.session.last_will.retain = 0;
    config.network.reconnect_timeout_ms = 5000;
    config.buffer.size = 4096;
    config.buffer.out_size = 2048;
    /* Starts are parsed on this task, and with trusted keys their signature is checked here too:
     * libsodium's Ed25519 verification adds a few KB of stack (estimated from its frames, not
     * measured on a board), so signing fleets get 4 KB more. */
    config.task.stack_size = proplet->cfg.trusted_keys.count > 0 ? 8192 + 4096 : 8192;
    /* Messages queued while offline are bounded (bytes); beyond it the newest are refused. */
    config.outbox.limit = 32 * 1024;
    client = esp_mqtt_client_init(&config);
    if (client == NULL)
        return false;
    esp_mqtt_client_register_event(client, ESP_EVENT_ANY_ID, on_mqtt, NULL);
    return esp_mqtt_client_start(client) == ESP_OK;
}

bool mqtt_send(const char *topic, const char *payload, size_t len)
{
    /* Enqueue, never block: this runs in the MQTT event handler too. */
    return client != NULL && esp_mqtt_client_enqueue(client, topic, payload, (int)len, 1, 0, true) >= 0;
}
